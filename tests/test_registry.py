"""The SQLite registry on its own: schema, centroids per model, data_version across processes.

The embeddings here are plain vectors written by the test (the registry stores whatever the embedder
produced; the enrollment tests feed it real embeddings of real cries).
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cryid.enrollment.config import RegistrySettings
from cryid.enrollment.registry import (
    SCHEMA_VERSION,
    NewSample,
    Registry,
    RegistryError,
    SampleEmbeddings,
    check_baby_id,
)
from cryid.models.scoring import centroid

SHA_A = "a" * 64
SHA_B = "b" * 64


def _sample(vectors: np.ndarray, sha: str = SHA_A, period: str = "birth") -> NewSample:
    n = vectors.shape[0]
    return NewSample(
        source_kind="file",
        source="x.flac",
        period=period,
        duration_s=7.0,
        cry_s=0.5 * n,
        n_expirations=n,
        embeddings=SampleEmbeddings(sha, vectors.astype(np.float32), tuple(range(n)), tuple(range(1, n + 1))),
    )


def _enroll(reg: Registry, baby_id: str, vectors: np.ndarray, sha: str = SHA_A) -> None:
    with reg.transaction() as conn:
        Registry.insert_infant(conn, baby_id, "", "nursery")
        Registry.insert_sample(conn, baby_id, _sample(vectors, sha))


def test_open_creates_wal_schema(tmp_path: Path) -> None:
    reg = Registry.open(tmp_path / "state", RegistrySettings())
    try:
        assert reg.schema_version() == SCHEMA_VERSION
        assert reg.path.parent == tmp_path / "state"
        mode = reg._query("PRAGMA journal_mode")[0][0]
        assert mode.lower() == "wal"
        assert reg.integrity_check() == "ok"
    finally:
        reg.close()


def test_newer_schema_refused(tmp_path: Path) -> None:
    Registry.open(tmp_path, RegistrySettings()).close()
    conn = sqlite3.connect(tmp_path / "registry.sqlite3")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RegistryError, match="newer than this cryid"):
        Registry.open(tmp_path, RegistrySettings())


def test_centroids_per_model_and_status(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    va, vb = rng.normal(size=(3, 8)), rng.normal(size=(2, 8))
    with Registry.open(tmp_path, RegistrySettings()) as reg:
        _enroll(reg, "baby-a", va)
        _enroll(reg, "baby_b", vb, sha=SHA_B)
        cents = reg.centroids(SHA_A)
        assert set(cents) == {"baby-a"}
        np.testing.assert_allclose(cents["baby-a"], centroid(va), rtol=1e-6)
        assert np.isclose(np.linalg.norm(cents["baby-a"]), 1.0)
        # baby_b was embedded with another model only: it is not mixed in, it needs re-enrollment.
        assert reg.needs_reenrollment(SHA_A) == ["baby_b"]
        assert reg.needs_reenrollment(SHA_B) == ["baby-a"]
        with reg.transaction() as conn:
            Registry.set_status(conn, "baby-a", "discharged")
        assert reg.centroids(SHA_A) == {}
        assert reg.needs_reenrollment(SHA_A) == ["baby_b"]
        with reg.transaction() as conn:
            assert Registry.delete_infant(conn, "baby-a")
        assert reg._query("SELECT count(*) FROM embeddings e JOIN samples s USING (sample_id) "
                          "WHERE s.baby_id = 'baby-a'")[0][0] == 0


def test_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    with Registry.open(tmp_path, RegistrySettings()) as reg:
        v0 = reg.data_version()
        with pytest.raises(RuntimeError), reg.transaction() as conn:
            Registry.insert_infant(conn, "half", "", "nursery")
            raise RuntimeError("boom")
        assert reg.get_infant("half") is None
        assert reg.data_version() == v0


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "a#", "bébé", "a b", "x" * 65])
def test_baby_id_must_be_topic_level(bad: str) -> None:
    with pytest.raises(RegistryError, match="MQTT topic level"):
        check_baby_id(bad)


def test_data_version_sees_other_process_commit(tmp_path: Path) -> None:
    with Registry.open(tmp_path, RegistrySettings()) as reg:
        before = reg.data_version()
        assert reg.data_version() == before  # stable while nothing changes
        script = textwrap.dedent(
            f"""
            import numpy as np
            from pathlib import Path
            from cryid.enrollment.config import RegistrySettings
            from cryid.enrollment.registry import Registry, NewSample, SampleEmbeddings
            reg = Registry.open(Path({str(tmp_path)!r}), RegistrySettings())
            with reg.transaction() as conn:
                Registry.insert_infant(conn, "other", "", "nursery")
            reg.close()
            """
        )
        subprocess.run([sys.executable, "-c", script], check=True)
        after = reg.data_version()
        assert after != before
        assert reg.get_infant("other") is not None
        # own commits change it too
        _enroll(reg, "own", np.ones((1, 4)))
        assert reg.data_version() != after
