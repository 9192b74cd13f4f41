"""`cryid model export`: the fixture's Hugging Face layout, the manifest, back-end, refusals, atomicity."""

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
from cryid.models.embedder import Embedder
from cryid.models.files import sha256_file
from cryid.models.manifest import MANIFEST_NAME, ONNX_NAME, load_manifest
from cryid.models.scoring import cosine
from cryid.models.training.export import check_clips
from tests.fixtures.cli import cli_error

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`

pytest.importorskip("speechbrain", reason="export needs the `train` extra")

PUBLISHED_FILES = {
    "hyperparams.yaml",
    "embedding_model.ckpt",
    "mean_var_norm_emb.ckpt",
    "classifier.ckpt",
    "label_encoder.txt",
}


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture()
def src_copy(small_speechbrain_model_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(small_speechbrain_model_dir, dst)
    return dst


def test_fixture_has_the_published_layout(speechbrain_model_dir: Path) -> None:
    assert {p.name for p in speechbrain_model_dir.iterdir()} == PUBLISHED_FILES
    text = (speechbrain_model_dir / "hyperparams.yaml").read_text()
    for key in (
        "compute_features:",
        "mean_var_norm:",
        "embedding_model:",
        "mean_var_norm_emb:",
        "classifier:",
    ):
        assert f"\n{key} !new:" in text
    assert "channels: [1024, 1024, 1024, 1024, 3072]" in text and "lin_neurons: 192" in text
    assert "pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer" in text
    assert "'starting_index' => 0" in (speechbrain_model_dir / "label_encoder.txt").read_text()


def test_manifest_of_the_export(onnx_model_dir: Path, speechbrain_model_dir: Path) -> None:
    m = load_manifest(onnx_model_dir)
    assert sorted(p.name for p in onnx_model_dir.iterdir()) == [MANIFEST_NAME, ONNX_NAME]
    assert m.format_version == 1 and m.source == str(speechbrain_model_dir)
    assert m.onnx_sha256 == sha256_file(onnx_model_dir / ONNX_NAME)
    assert m.embedding_dim == 192 and m.opset == 17
    assert m.frontend.n_mels == 80 and m.frontend.hop_length == 160 and m.frontend.top_db == 80.0
    assert m.parity.min_cosine >= 0.9999 and len(m.parity.clips_s) >= 3
    assert m.quantization is None and m.backend is None and m.training is None
    assert {"torch", "speechbrain", "onnxruntime"} <= set(m.versions)
    assert not [p for p in onnx_model_dir.parent.iterdir() if ".partial-" in p.name]
    umask = os.umask(0)
    os.umask(umask)
    assert onnx_model_dir.stat().st_mode & 0o777 == 0o777 & ~umask  # readable by the service user


def test_backend_and_train_info_are_appended(
    src_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryid.models.training.speechbrain_io import load_encoder_classifier

    rng = np.random.default_rng(5)
    mean = rng.standard_normal(192).astype(np.float32)
    transform = rng.standard_normal((192, 20)).astype(np.float32)
    np.savez(src_copy / "backend.npz", mean=mean, transform=transform, kind=np.array("lda"))
    info = {"command": "cryid model train --data D --out O", "metrics": {"dev_eer": 0.25}}
    (src_copy / "train_info.json").write_text(json.dumps(info))
    out = tmp_path / "with-backend"
    assert cryid_main(["model", "export", str(src_copy), "--out", str(out)]) == 0
    assert "20-d embedding" in capsys.readouterr().out
    m = load_manifest(out)
    assert m.backend is not None and (m.backend.input_dim, m.backend.output_dim, m.backend.kind) == (
        192,
        20,
        "lda",
    )
    assert m.training is not None and m.training.command == info["command"]
    assert m.metrics == {"dev_eer": 0.25} and m.embedding_dim == 20
    assert m.export_command is not None and m.export_command.startswith("cryid model export")
    emb = Embedder(out)
    clf = load_encoder_classifier(str(src_copy))
    import torch

    for clip in check_clips(durations_s=(0.9, 2.2)):
        with torch.no_grad():
            ref = clf.encode_batch(torch.from_numpy(clip)[None], normalize=False)[0, 0].numpy()
        assert cosine(emb.embed(clip), (ref - mean) @ transform) >= 0.9999


def test_gmm_branch_is_fused_inside_the_graph(src_copy: Path, tmp_path: Path) -> None:
    """A gmm_branch.npz beside the back-end: the graph returns [a/|a|, b/|b|]/sqrt(2), equal to speechbrain
    + back-end fused with the NumPy branch, in batches too; the manifest names the branch."""
    from cryid.models.frontend import Fbank
    from cryid.models.training.gmm_branch import fit_branch, fuse, load_branch
    from cryid.models.training.speechbrain_io import load_encoder_classifier

    rng = np.random.default_rng(6)
    mean = rng.standard_normal(192).astype(np.float32)
    transform = rng.standard_normal((192, 12)).astype(np.float32)
    np.savez(src_copy / "backend.npz", mean=mean, transform=transform, kind=np.array("lda"))
    fb = Fbank()
    clips = [
        (0.1 * rng.standard_normal(int(16000 * rng.uniform(0.6, 1.5)))).astype(np.float32) for _ in range(16)
    ]
    feats = [fb.log_mel(c) - 50.0 for c in clips]
    fit_branch(feats, [str(i % 4) for i in range(16)], components=4, dims=3, n_ceps=10).save(src_copy)
    out = tmp_path / "fused"
    assert cryid_main(["model", "export", str(src_copy), "--out", str(out)]) == 0
    m = load_manifest(out)
    assert m.branch is not None and (m.branch.components, m.branch.cepstra, m.branch.output_dim) == (4, 10, 3)
    assert m.embedding_dim == 15 and m.parity.min_cosine >= 0.9999 and "GMM branch" in m.parity.reference
    emb = Embedder(out)
    clf = load_encoder_classifier(str(src_copy))
    branch = load_branch(src_copy)
    frontend = Fbank(m.frontend)
    import torch

    for clip in check_clips(durations_s=(0.9, 2.2)):
        with torch.no_grad():
            ref = clf.encode_batch(torch.from_numpy(clip)[None], normalize=False)[0, 0].numpy()
        want = fuse((ref - mean) @ transform, branch.embed(frontend.features(clip)))[0]
        got = emb.embed(clip)
        assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-4)
        assert cosine(got, want) >= 0.9999


def test_a_branch_without_a_back_end_is_refused(src_copy: Path, tmp_path: Path, capsys) -> None:
    from cryid.models.training.gmm_branch import fit_branch

    rng = np.random.default_rng(7)
    feats = [rng.standard_normal((60, 80)).astype(np.float32) for _ in range(8)]
    fit_branch(feats, [str(i % 2) for i in range(8)], components=2, dims=1, n_ceps=4).save(src_copy)
    out = tmp_path / "no-backend"
    assert "no back-end" in cli_error(capsys, ["model", "export", str(src_copy), "--out", str(out)])
    _nothing_written(out)


def test_refuses_a_model_that_disagrees_with_speechbrain(
    src_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A front end cryid does not reproduce (band-limited Fbank): the parity check must refuse it.
    hp = src_copy / "hyperparams.yaml"
    text = hp.read_text().replace(
        "    n_mels: !ref <n_mels>\n", "    n_mels: !ref <n_mels>\n    f_max: 4000\n", 1
    )
    hp.write_text(text)
    out = tmp_path / "refused"
    err = cli_error(capsys, ["model", "export", str(src_copy), "--out", str(out)])
    assert "disagrees with speechbrain" in err and "nothing written" in err
    _nothing_written(out)


def test_src_without_embedding_model_ckpt(src_copy: Path, tmp_path: Path, capsys) -> None:
    (src_copy / "embedding_model.ckpt").unlink()
    out = tmp_path / "out"
    err = cli_error(capsys, ["model", "export", str(src_copy), "--out", str(out)])
    assert "embedding_model.ckpt missing" in err
    _nothing_written(out)


def test_bad_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert "not a Hugging Face hub id" in cli_error(
        capsys, ["model", "export", "./no/such/dir", "--out", str(out)]
    )
    f = tmp_path / "file.ckpt"
    f.write_bytes(b"x")
    assert "is a file" in cli_error(capsys, ["model", "export", str(f), "--out", str(out)])
    _nothing_written(out)


def test_backend_of_wrong_size(src_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "bk.npz", mean=np.zeros(64, np.float32), transform=np.zeros((64, 8), np.float32))
    out = tmp_path / "out"
    argv = ["model", "export", str(src_copy), "--out", str(out), "--backend", str(tmp_path / "bk.npz")]
    assert "expects 64-d embeddings but the model gives 192-d" in cli_error(capsys, argv)
    _nothing_written(out)


def test_existing_out_needs_force(src_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert "already exists" in cli_error(capsys, ["model", "export", str(src_copy), "--out", str(out)])
    assert (out / "keep.txt").exists()
    assert cryid_main(["model", "export", str(src_copy), "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, ONNX_NAME]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_hub_id_offline_says_what_to_download(tmp_path: Path) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE at import, so run the real `cryid` in a fresh process.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cryid.daemon.cli", "model", "export", "speechbrain/spkrec-ecapa-voxceleb"]
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode != 0 and len(err.splitlines()) == 1, err
    assert "cannot download" in err and "https://huggingface.co/speechbrain/spkrec-ecapa-voxceleb" in err
    assert "embedding_model.ckpt" in err and "pass that folder as SRC" in err
    assert not out.exists()
