"""``cryid enroll import`` refuses a damaged export file as a whole: a bad baby id or an unknown status
is a one-line error that names the file and the fix, and nothing of the file is imported.

The export is made by ``cryid.enrollment.transfer.export_registry`` from a registry whose embeddings
are tagged with the shipped model's sha256 (the vectors need not come from audio: the import only
moves them), then edited as a damaged or hand-edited file would be.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cryid.enrollment.config import RegistrySettings
from cryid.enrollment.registry import NewSample, Registry, SampleEmbeddings
from cryid.enrollment.transfer import export_registry
from cryid.models.manifest import load_manifest
from tests.fixtures.cli import cryid_env

CRYID = [sys.executable, "-m", "cryid.daemon.cli"]


@pytest.fixture()
def export_doc(shipped_model_dir: Path, tmp_path: Path) -> dict:
    """An export of two babies, ada (active) and ben (discharged), as a dict."""
    sha, dim = load_manifest(shipped_model_dir).onnx_sha256, load_manifest(shipped_model_dir).embedding_dim
    rng = np.random.default_rng(0)
    with Registry.open(tmp_path / "source-state", RegistrySettings()) as reg:
        with reg.write() as tx:
            for baby, status in (("ada", "active"), ("ben", "discharged")):
                tx.insert_infant(baby, baby.title(), "ward1", status)
                emb = SampleEmbeddings(
                    sha, rng.normal(size=(2, dim)).astype(np.float32), (0, 9000), (8000, 17000)
                )
                tx.insert_sample(
                    baby,
                    NewSample(source_kind="file", source=f"{baby}.wav", period="birth", duration_s=2.0,
                              cry_s=1.0, n_expirations=2, created_at="2026-01-01T00:00:00+00:00",
                              audio_flac=None, embeddings=emb),
                )  # fmt: skip
        export_registry(reg, sha, tmp_path / "export.json")
    return json.loads((tmp_path / "export.json").read_text())


def _import(tmp_path: Path, model: Path, doc: dict) -> tuple[subprocess.CompletedProcess[str], Path]:
    path = tmp_path / "to-import.json"
    path.write_text(json.dumps(doc))
    state = tmp_path / "ward-state"
    env = cryid_env()
    env |= {"CRYID_STATE_DIR": str(state), "CRYID_MODEL": str(model)}
    done = subprocess.run(
        [*CRYID, "enroll", "import", str(path)], env=env, capture_output=True, text=True, timeout=120
    )
    return done, path


def _infants(state: Path) -> list[tuple[str, str]]:
    with Registry.open(state, RegistrySettings()) as reg:
        return [(i.baby_id, i.status) for i in reg.infants()]


def test_a_good_export_imports_every_baby_with_its_status(
    export_doc: dict, shipped_model_dir: Path, tmp_path: Path
) -> None:
    done, _ = _import(tmp_path, shipped_model_dir, export_doc)
    assert done.returncode == 0, done.stderr
    assert _infants(tmp_path / "ward-state") == [("ada", "active"), ("ben", "discharged")]


@pytest.mark.parametrize(
    ("field", "value", "what"),
    [
        ("baby_id", "../ben", "baby id"),
        ("baby_id", "ben/+", "baby id"),
        ("baby_id", "", "baby id"),
        ("status", "sleeping", "status"),
        ("status", "ACTIVE", "status"),
    ],
)
def test_a_bad_baby_id_or_status_refuses_the_whole_file(
    export_doc: dict, shipped_model_dir: Path, tmp_path: Path, field: str, value: str, what: str
) -> None:
    export_doc["infants"][1][field] = value  # the second baby: the first one must not slip in either
    done, path = _import(tmp_path, shipped_model_dir, export_doc)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cryid: error:"), done.stderr
    assert str(path) in lines[0] and what in lines[0] and "export it again" in lines[0], lines[0]
    assert repr(value) in lines[0]
    assert _infants(tmp_path / "ward-state") == []
