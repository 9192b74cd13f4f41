"""The run-time Embedder: parity with speechbrain, padding invariance, int8, no torch, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cryid.daemon.cli import main as cryid_main
from cryid.models.audio import AudioError, load_audio
from cryid.models.config import EmbedderSettings
from cryid.models.embedder import Embedder
from cryid.models.files import sha256_file
from cryid.models.manifest import MANIFEST_NAME, ONNX_NAME, ModelError
from cryid.models.scoring import cosine
from tests.fixtures.cli import cli_error
from tests.fixtures.data import dac_rows

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`

PARITY = 0.9999


def _sb(model_dir: Path):
    pytest.importorskip("speechbrain", reason="speechbrain reference needs the `train` extra")
    from cryid.models.training.speechbrain_io import load_encoder_classifier

    return load_encoder_classifier(str(model_dir))


def _sb_embed(clf, wav: np.ndarray) -> np.ndarray:
    import torch

    # One thread: on a shared 2-core machine torch's OpenMP pool is ~25x slower with two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return clf.encode_batch(torch.from_numpy(wav)[None], normalize=False)[0, 0].numpy()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sb_published(speechbrain_model_dir: Path):
    return _sb(speechbrain_model_dir)


@pytest.fixture(scope="module")
def embedder(onnx_model_dir: Path) -> Embedder:
    return Embedder(onnx_model_dir)


@pytest.fixture(scope="module")
def dev_wavs(dac_dir: Path) -> list[np.ndarray]:
    return [load_audio(dac_dir / r["file_name"]) for r in dac_rows("dev")]


def test_parity_on_every_dev_file(
    small_speechbrain_model_dir: Path, small_onnx_model_dir: Path, dev_wavs
) -> None:
    # Every dev file, whole, through the published layout and code path at C=128 (the C=1024 model
    # is checked on a spread of files below: same graph, 60x the compute).
    clf = _sb(small_speechbrain_model_dir)
    emb = Embedder(small_onnx_model_dir)
    cos = [cosine(emb.embed(w), _sb_embed(clf, w)) for w in dev_wavs]
    print(f"\nEmbedder vs speechbrain encode_batch, {len(cos)} dev files (C=128): min cosine {min(cos):.7f}")
    assert min(cos) >= PARITY


def test_parity_published_size_on_dev_files(sb_published, embedder: Embedder, dev_wavs) -> None:
    # A spread of 6 files by default; CRYID_FULL_PARITY=1 checks every dev file at C=1024 (~2 min).
    picks = dev_wavs if os.environ.get("CRYID_FULL_PARITY") else dev_wavs[:: max(1, len(dev_wavs) // 6)][:6]
    cos = [cosine(embedder.embed(w), _sb_embed(sb_published, w)) for w in picks]
    print(f"\nEmbedder vs speechbrain encode_batch, {len(cos)} dev files (C=1024): min cosine {min(cos):.7f}")
    assert min(cos) >= PARITY


def test_batch_of_mixed_lengths_matches_each_clip_alone(sb_published, embedder: Embedder, dev_wavs) -> None:
    seconds = [0.45, 1.0, 2.3, 1.0, 3.7, 0.8]
    clips = [w[: int(s * 16000)] for w, s in zip(dev_wavs[3:], seconds, strict=False)]
    batch = embedder.embed_batch(clips)
    assert batch.shape == (len(clips), embedder.dim) and batch.dtype == np.float32
    cos = [cosine(row, _sb_embed(sb_published, clip)) for row, clip in zip(batch, clips, strict=True)]
    print(f"\nmixed-length batch {seconds} s vs speechbrain per clip: min cosine {min(cos):.7f}")
    assert min(cos) >= PARITY
    for row, clip in zip(batch, clips, strict=True):
        np.testing.assert_allclose(row, embedder.embed(clip), rtol=1e-4, atol=1e-5)


def test_int8_agrees_with_fp32(
    onnx_int8_model_dir: Path, onnx_model_dir: Path, embedder: Embedder, dev_wavs
) -> None:
    int8 = Embedder(onnx_int8_model_dir)
    q = int8.manifest.quantization
    assert q is not None and q.min_cosine_to_fp32 >= 0.99
    assert (onnx_int8_model_dir / ONNX_NAME).stat().st_size < 0.4 * (
        onnx_model_dir / ONNX_NAME
    ).stat().st_size
    cos = [cosine(int8.embed(w), embedder.embed(w)) for w in dev_wavs[::10]]
    print(
        f"\nint8 vs fp32 on {len(cos)} dev files: min cosine {min(cos):.5f} "
        f"(manifest {q.min_cosine_to_fp32:.5f})"
    )
    assert min(cos) >= 0.99


def test_embedder_attributes(shipped_model_dir: Path) -> None:
    embedder = Embedder(shipped_model_dir)
    dim = json.loads((shipped_model_dir / MANIFEST_NAME).read_text())["embedding_dim"]
    assert embedder.dim == dim and embedder.sample_rate == 16000
    assert embedder.sha256 == sha256_file(shipped_model_dir / ONNX_NAME) == embedder.manifest.onnx_sha256
    out = embedder.embed(np.random.default_rng(1).standard_normal(16000).astype(np.float32) * 0.1)
    assert out.shape == (dim,) and out.dtype == np.float32
    # the daemon normalises; the graph does only where a fused GMM branch makes each half unit length
    fused = embedder.manifest.branch is not None
    assert (abs(float(np.linalg.norm(out)) - 1.0) < 1e-4) == fused
    assert embedder.embed_batch([]).shape == (0, dim)


def test_embedder_import_pulls_in_no_torch() -> None:
    code = (
        "import sys, cryid.models.embedder, cryid.models.frontend, cryid.models.manifest; "
        "bad = [m for m in ('torch', 'speechbrain', 'torchaudio') if m in sys.modules]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# --- bad input -------------------------------------------------------------------------------------


@pytest.fixture()
def model_copy(shipped_model_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(shipped_model_dir, dst)
    return dst


def test_cli_info_prints_manifest(shipped_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cryid_main(["model", "info", str(shipped_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "parity" in out and "verified" in out
    assert "GMM branch    8 UBM(s) x 64 components on 20 cepstra + deltas -> 640-d" in out
    assert cryid_main(["model", "info", str(shipped_model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["embedding_dim"] == Embedder(shipped_model_dir).dim == 720  # LDA 80 + 8 GMM members x 80


def test_missing_model_onnx(model_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (model_copy / ONNX_NAME).unlink()
    with pytest.raises(ModelError, match=r"model\.onnx: missing"):
        Embedder(model_copy)
    assert "missing" in cli_error(capsys, ["model", "info", str(model_copy)])


def test_sha256_mismatch(model_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with open(model_copy / ONNX_NAME, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelError, match="does not match the manifest"):
        Embedder(model_copy)
    assert "sha256" in cli_error(capsys, ["model", "info", str(model_copy)])


def test_corrupt_model_onnx(model_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A damaged file whose manifest was updated to match: onnxruntime itself must refuse it.
    path = model_copy / ONNX_NAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    manifest = json.loads((model_copy / MANIFEST_NAME).read_text())
    manifest["onnx_sha256"] = sha256_file(path)
    (model_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="onnxruntime cannot load it"):
        Embedder(model_copy)
    assert "onnxruntime cannot load" in cli_error(capsys, ["model", "info", str(model_copy)])


def test_missing_or_invalid_manifest(model_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (model_copy / MANIFEST_NAME).write_text("{not json")
    assert "not valid JSON" in cli_error(capsys, ["model", "info", str(model_copy)])
    (model_copy / MANIFEST_NAME).unlink()
    assert "manifest.json: missing" in cli_error(capsys, ["model", "info", str(model_copy)])
    assert "no such model directory" in cli_error(capsys, ["model", "info", str(model_copy / "nope")])


def test_wrong_audio_is_refused(shipped_model_dir: Path) -> None:
    emb = Embedder(shipped_model_dir, EmbedderSettings(warmup=False))
    wav = np.zeros(16000, dtype=np.float32)
    with pytest.raises(AudioError, match=r"audio at 8000 Hz, the model expects 16000 Hz"):
        emb.embed(wav, sample_rate=8000)
    with pytest.raises(AudioError, match="audio at 44100 Hz"):
        emb.embed_batch([wav, wav], sample_rate=44100)
    with pytest.raises(AudioError, match="too short"):
        emb.embed(wav[:100])
    with pytest.raises(AudioError, match="1-D mono"):
        emb.embed(np.zeros((16000, 2), dtype=np.float32))
    bad = wav.copy()
    bad[5] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        emb.embed(bad)
