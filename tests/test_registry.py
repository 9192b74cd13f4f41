"""The SQLite registry on its own: schema and migration, centroids and references per model and room,
data_version across processes.

The embeddings here are plain vectors written by the test (the registry stores whatever the embedder
produced; the enrollment tests feed it real embeddings of real cries).
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from cryid.enrollment import feedback
from cryid.enrollment.config import RegistrySettings
from cryid.enrollment.episodes import NewEpisode
from cryid.enrollment.registry import (
    SCHEMA_VERSION,
    NewSample,
    Registry,
    RegistryError,
    SampleEmbeddings,
    check_baby_id,
)
from cryid.models.scoring import centroid

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`

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
    with reg.write() as tx:
        tx.insert_infant(baby_id, "", "nursery")
        tx.insert_sample(baby_id, _sample(vectors, sha))


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
        with reg.write() as tx:
            tx.set_status("baby-a", "discharged")
        assert reg.centroids(SHA_A) == {}
        assert reg.needs_reenrollment(SHA_A) == ["baby_b"]
        with reg.write() as tx:
            assert tx.delete_infant("baby-a")
        assert reg._query("SELECT count(*) FROM embeddings e JOIN samples s USING (sample_id) "
                          "WHERE s.baby_id = 'baby-a'")[0][0] == 0


def test_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    with Registry.open(tmp_path, RegistrySettings()) as reg:
        v0 = reg.data_version()
        with pytest.raises(RuntimeError), reg.write() as tx:
            tx.insert_infant("half", "", "nursery")
            raise RuntimeError("boom")
        assert reg.get_infant("half") is None
        assert reg.data_version() == v0


def test_a_write_is_usable_only_inside_its_transaction(tmp_path: Path) -> None:
    with Registry.open(tmp_path, RegistrySettings()) as reg:
        with reg.write() as tx:
            tx.insert_infant("kept", "", "nursery")
        with pytest.raises(RuntimeError, match="after its transaction ended"):
            tx.delete_infant("kept")  # no statement outside BEGIN ... COMMIT
        assert reg.get_infant("kept") is not None


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
            with reg.write() as tx:
                tx.insert_infant("other", "", "nursery")
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


def test_migration_from_schema_1_keeps_babies_and_adds_episodes(tmp_path: Path) -> None:
    """A registry made by the first release (schema 1) opens, migrates and keeps its babies."""
    from cryid.enrollment.registry import MIGRATIONS

    db = sqlite3.connect(tmp_path / RegistrySettings().filename)
    for statement in MIGRATIONS[0]:
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    db.execute(
        "INSERT INTO infants VALUES ('old', '', 'nursery', 'active', '2026-01-01', '2026-01-01', NULL)"
    )
    db.commit()
    db.close()
    with Registry.open(tmp_path, RegistrySettings()) as reg:
        assert reg.schema_version() == SCHEMA_VERSION == 2
        assert [i.baby_id for i in reg.infants()] == ["old"]
        assert reg.episodes() == [] and reg.feedback() == []
        assert reg.integrity_check() == "ok"


def _episode(vectors: np.ndarray, sha: str = SHA_A) -> NewEpisode:
    t = datetime.now(timezone.utc)
    return NewEpisode(str(uuid.uuid4()), "nursery", t, t, sha, "unknown", None, "a", "{}", vectors)


def test_references_birth_and_confirmed_per_room_model_and_status(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    s = RegistrySettings()
    with Registry.open(tmp_path, s) as reg:
        va, vb, vc = rng.standard_normal((3, 4, 8))
        _enroll(reg, "a", va)
        _enroll(reg, "b", vb)
        with reg.write() as tx:
            tx.insert_infant("c", "", "nicu")
            tx.insert_sample("c", _sample(vc))
        e1, e2, e3 = (_episode(rng.standard_normal((3, 8)).astype(np.float32)) for _ in range(3))
        e_other = _episode(rng.standard_normal((2, 8)).astype(np.float32), sha=SHA_B)
        for e in (e1, e2, e3, e_other):
            feedback.keep_episode(reg, e, s)
        c1 = feedback.confirm(reg, e1.episode_id, "a", s, by="t")
        feedback.confirm(reg, e2.episode_id, "a", s, by="t")
        feedback.confirm(reg, e3.episode_id, "c", s, by="t")
        feedback.confirm(reg, e_other.episode_id, "b", s, by="t")
        birth, confirmed = reg.references(SHA_A, "nursery")
        assert sorted(birth) == ["a", "b"] and sorted(confirmed) == ["a"]  # b's is for another model
        assert np.allclose(birth["a"], centroid(va), atol=1e-6)
        assert np.allclose(confirmed["a"], centroid(np.concatenate([e1.vectors, e2.vectors])), atol=1e-6)
        assert sorted(reg.references(SHA_A, None)[1]) == ["a", "c"]
        assert sorted(reg.references(SHA_A, "nicu")[1]) == ["c"]
        feedback.undo(reg, c1.confirmation_id, by="t")  # a's confirmed reference is e2's alone
        assert np.allclose(reg.references(SHA_A, "nursery")[1]["a"], centroid(e2.vectors), atol=1e-6)
        with reg.write() as tx:
            tx.set_status("a", "discharged")
        birth, confirmed = reg.references(SHA_A, "nursery")
        assert sorted(birth) == ["b"] and confirmed == {}


def test_keeping_episodes_does_not_bump_own_data_version_confirming_does(tmp_path: Path) -> None:
    """The daemon keeps an episode every few seconds: that must not make it reload the references; a
    confirmation must (from this connection, as over MQTT, and from another one, as the CLI)."""
    from cryid.enrollment import feedback

    s = RegistrySettings()
    with Registry.open(tmp_path, s) as reg, Registry.open(tmp_path, s) as cli:
        _enroll(reg, "a", np.ones((2, 8)))
        e1, e2 = _episode(np.ones((2, 8), np.float32)), _episode(np.ones((2, 8), np.float32))
        v0, c0 = reg.data_version(), cli.data_version()
        feedback.keep_episode(reg, e1, s)
        feedback.keep_episode(reg, e2, s)
        assert reg.data_version() == v0
        assert cli.data_version() != c0  # other connections do see the write
        feedback.confirm(reg, e1.episode_id, "a", s, by="t")
        v1 = reg.data_version()
        assert v1 != v0
        feedback.confirm(cli, e2.episode_id, "a", s, by="t")
        assert reg.data_version() != v1
