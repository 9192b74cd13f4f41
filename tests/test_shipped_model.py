"""The shipped model (``models/default``): its ONNX graph against its speechbrain source (and, where it
has one, its GMM-supervector branch's NumPy reference).

The source folder is not in the repository (the manifest names where it was made), so the test
rebuilds it with the training command the manifest records (a statistics-initialised network,
``--epochs 0``, and an LDA fitted on the train split: deterministic, about a minute and a half on
two cores), checks that the rebuild reproduces the recorded metrics, then compares speechbrain's
``encode_batch(normalize=False)`` + the back-end with the shipped ONNX graph on real dev cries.
Needs the ``train`` extra and ../shared/data.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cryid.models.audio import load_audio
from cryid.models.embedder import Embedder
from cryid.models.scoring import cosine
from tests.fixtures.cli import cryid_env
from tests.fixtures.data import dac_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shipped_source(shipped_model_dir: Path, dac_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The speechbrain folder the shipped model was exported from: ``$CRYID_TEST_SHIPPED_SOURCE`` or the
    manifest's ``source`` when it exists on this machine, else rebuilt with the manifest's recorded
    training command (and then checked to reproduce the recorded metrics)."""
    pytest.importorskip("speechbrain", reason="the speechbrain source needs the `train` extra")
    manifest = json.loads((shipped_model_dir / "manifest.json").read_text())
    for source in (
        Path(os.environ.get("CRYID_TEST_SHIPPED_SOURCE", "/nonexistent")),
        Path(manifest["source"]),
    ):
        if (source / "hyperparams.yaml").is_file():
            return source
    args = shlex.split(manifest["training"]["command"])
    assert args[:3] == ["cryid", "model", "train"], args
    out = tmp_path_factory.mktemp("shipped-source") / "run"
    args[args.index("--data") + 1] = str(dac_dir)
    args[args.index("--out") + 1] = str(out)
    env = cryid_env()
    done = subprocess.run(
        [sys.executable, "-m", "cryid.daemon.cli", *args[1:]], env=env, capture_output=True, text=True,
        timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((out / "train_info.json").read_text())
    for key, want in manifest["training"]["metrics"].items():  # the rebuild is the same model
        assert info["metrics"][key] == pytest.approx(want, abs=1e-6), key
    return out


def test_shipped_onnx_matches_its_speechbrain_source(
    shipped_model_dir: Path, shipped_source: Path, dac_dir: Path
):
    import torch

    from cryid.models.frontend import Fbank
    from cryid.models.training.backend import load_backend
    from cryid.models.training.gmm_branch import BRANCH_NAME, fuse, load_branch
    from cryid.models.training.speechbrain_io import load_encoder_classifier

    manifest = json.loads((shipped_model_dir / "manifest.json").read_text())
    clf = load_encoder_classifier(shipped_source)
    backend = load_backend(shipped_source)
    branch = load_branch(shipped_source) if (shipped_source / BRANCH_NAME).is_file() else None
    assert (branch is None) == (manifest.get("branch") is None), "the source and the manifest disagree"
    embedder = Embedder(shipped_model_dir)
    frontend = Fbank(embedder.manifest.frontend)
    rows = dac_rows("dev")[::15]
    assert len(rows) >= 5
    cos = []
    with torch.no_grad():
        for r in rows:
            wav = load_audio(dac_dir / r["file_name"])
            ref = clf.encode_batch(torch.from_numpy(wav)[None], normalize=False)[0, 0].numpy()
            ref = backend.apply(ref)
            if branch is not None:  # the GMM branch's NumPy reference on the daemon's own features
                ref = fuse(ref, branch.embed(frontend.features(wav)))[0]
            got = embedder.embed(wav)
            assert got.shape == ref.shape == (manifest["embedding_dim"],)
            cos.append(cosine(ref, got))
    print(f"\nshipped ONNX vs rebuilt speechbrain source on {len(cos)} dev files: min cosine {min(cos):.6f}")
    assert min(cos) >= manifest["parity"]["threshold"]
