"""`cryid model train`: a few steps on a tiny subset of real cries, resume, export, ONNX parity.

Real speechbrain training on CPU with a tiny ECAPA-TDNN (C=16), real cries from ../shared/data
(skipped when absent), cryid's real exporter and onnxruntime Embedder; nothing is mocked.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cryid.models.scoring import cosine

pytest.importorskip("speechbrain", reason="speechbrain (the `train` extra) is not installed")

N_TRAIN_BABIES = 8
N_DEV_BABIES = 3


def _tiny_set(dac_dir: Path, out: Path) -> Path:
    """A CryCeleb-layout folder with a few train and dev infants; the audio folder is a symlink."""
    out.mkdir()
    (out / "audio").symlink_to(dac_dir / "audio")
    with open(dac_dir / "metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    train_babies = sorted({r["baby_id"] for r in rows if r["split"] == "train"})[:N_TRAIN_BABIES]
    dev_babies = sorted({r["baby_id"] for r in rows if r["split"] == "dev"})[:N_DEV_BABIES]
    keep = [r for r in rows if r["baby_id"] in set(train_babies) | set(dev_babies)]
    with open(out / "metadata.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(keep)
    with open(out / "dev_pairs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["baby_id_B", "baby_id_D", "id", "label"])
        for b in dev_babies:
            for d in dev_babies:
                w.writerow([b, d, f"{b}B_{d}D", int(b == d)])
    ids = {r["file_id"] for r in keep}
    with open(dac_dir / "provenance.csv", newline="") as fh:
        prov = [r for r in csv.DictReader(fh) if r["file_id"] in ids]
    with open(out / "provenance.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(prov[0]))
        w.writeheader()
        w.writerows(prov)
    return out


@pytest.fixture(scope="module")
def tiny_set(dac_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_set(dac_dir, tmp_path_factory.mktemp("tiny") / "data")


def _settings(epochs: int):
    from cryid.models.training.train import TrainSettings

    return TrainSettings(
        channels=16,
        embedding_dim=16,
        epochs=epochs,
        batch_size=4,
        chunks_per_item=2,
        lr=1e-3,
        chunk_min_s=0.5,
        chunk_max_s=1.0,
        bandlimit_p=0.5,
        noise_p=0.5,
        gain_p=0.5,
        speed_p=0.5,
        max_freq_hz=4000,
        backend="lda",
        backend_dims=3,
        device="cpu",
        threads=1,
        seed=3,
    )


def test_train_resume_export_parity(tiny_set: Path, tmp_path: Path) -> None:
    import torch

    from cryid.models.embedder import Embedder
    from cryid.models.training.backend import load_backend
    from cryid.models.training.export import export_model
    from cryid.models.training.speechbrain_io import load_encoder_classifier
    from cryid.models.training.train import STATE_NAME, kept_mel_bins, train

    command = "cryid model train --data tiny --out run --channels 16 (test)"
    # straight: 2 epochs; interrupted: 1 epoch, then the same run asked for 2 resumes at epoch 2
    straight = train(_settings(2), tiny_set, tmp_path / "straight", command=command, progress=False)
    first = train(_settings(1), tiny_set, tmp_path / "resumed", command=command, progress=False)
    assert first.best_epoch == 1
    resumed = train(_settings(2), tiny_set, tmp_path / "resumed", command=command, progress=False)
    info = json.loads((tmp_path / "resumed" / "train_info.json").read_text())
    assert [e["epoch"] for e in info["epochs"]] == [1, 2]
    assert info["command"] == command
    assert resumed.best_epoch == straight.best_epoch
    a = torch.load(tmp_path / "straight" / STATE_NAME, weights_only=False)["embedding_model"]
    b = torch.load(tmp_path / "resumed" / STATE_NAME, weights_only=False)["embedding_model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=f"resumed {name} differs")
    assert {"eer", "eer_channel_matched", "top1"} <= set(resumed.metrics)

    # the bands above 4 kHz are switched off inside the checkpoint itself (plain speechbrain sees it)
    model_dir = tmp_path / "resumed"
    weights = torch.load(model_dir / "embedding_model.ckpt", weights_only=True)["blocks.0.conv.conv.weight"]
    assert float(weights[:, kept_mel_bins(4000) :, :].abs().max()) == 0.0
    assert float(weights[:, : kept_mel_bins(4000), :].abs().max()) > 0.0

    manifest = export_model(str(model_dir), tmp_path / "onnx")
    assert manifest.training is not None and manifest.training.command == command
    assert manifest.backend is not None and manifest.embedding_dim == 3

    from cryid.models.audio import load_audio

    wav = load_audio(next((tiny_set / "audio" / "dev").rglob("*.flac")))
    clf = load_encoder_classifier(model_dir)
    with torch.no_grad():
        ref = clf.encode_batch(torch.from_numpy(wav)[None], normalize=False)[0, 0].numpy()
    ref = load_backend(model_dir).apply(ref)
    got = Embedder(tmp_path / "onnx").embed(wav)
    cos = cosine(ref, got)
    assert cos >= 0.9999, f"ONNX embedding disagrees with the checkpoint: cosine {cos:.6f}"


def test_global_input_norm_trains_and_exports(tiny_set: Path, tmp_path: Path) -> None:
    """norm_type global: the training data's per-band mean is fixed before training, saved in the
    speechbrain layout (mean_var_norm.ckpt), carried into the manifest, and the ONNX path agrees."""
    import torch

    from cryid.models.audio import load_audio
    from cryid.models.embedder import Embedder
    from cryid.models.frontend import Fbank
    from cryid.models.training.backend import load_backend
    from cryid.models.training.export import export_model
    from cryid.models.training.speechbrain_io import load_encoder_classifier
    from cryid.models.training.train import train

    settings = _settings(1).model_copy(update={"input_norm": "global", "max_freq_hz": None})
    model_dir = tmp_path / "run"
    train(settings, tiny_set, model_dir, progress=False)
    with open(tiny_set / "metadata.csv", newline="") as fh:
        train_files = [tiny_set / r["file_name"] for r in csv.DictReader(fh) if r["split"] == "train"]
    fb = Fbank()
    frames = np.concatenate([fb.log_mel(load_audio(f)) for f in train_files])
    saved = torch.load(model_dir / "mean_var_norm.ckpt", weights_only=False)
    assert saved["count"] == len(frames)  # every training frame, and not updated by the training steps
    np.testing.assert_allclose(saved["glob_mean"].numpy(), frames.mean(0), atol=0.02)

    manifest = export_model(str(model_dir), tmp_path / "onnx")
    assert manifest.frontend.normalization == "global_mean"
    np.testing.assert_allclose(manifest.frontend.global_mean, saved["glob_mean"].numpy(), rtol=1e-6)
    wav = load_audio(next((tiny_set / "audio" / "dev").rglob("*.flac")))
    clf = load_encoder_classifier(model_dir)
    assert clf.mods.mean_var_norm.norm_type == "global"
    with torch.no_grad():
        ref = clf.encode_batch(torch.from_numpy(wav)[None], normalize=False)[0, 0].numpy()
    ref = load_backend(model_dir).apply(ref)
    embedder = Embedder(tmp_path / "onnx")
    got = embedder.embed(wav)
    cos = cosine(ref, got)
    assert cos >= 0.9999, f"ONNX embedding disagrees with the checkpoint: cosine {cos:.6f}"
    # unlike sentence normalisation, a louder copy of the clip is a different input
    louder = embedder.embed(np.clip(wav * 4.0, -1.0, 1.0))
    assert cosine(louder, got) < 0.9999


def test_global_input_norm_with_init_is_refused(tiny_set: Path, tmp_path: Path) -> None:
    from cryid.models.training.train import TrainError, train

    train(_settings(1).model_copy(update={"val_split": None}), tiny_set, tmp_path / "src", progress=False)
    settings = _settings(1).model_copy(update={"input_norm": "global"})
    with pytest.raises(TrainError, match="--input-norm global"):
        train(settings, tiny_set, tmp_path / "ft", init=str(tmp_path / "src"), progress=False)
    assert not (tmp_path / "ft" / "train_info.json").exists()


def test_cv_selection_and_resume_with_other_settings_is_refused(tiny_set: Path, tmp_path: Path) -> None:
    """``--select cv``: the reported train_cv_eer is the cross-validated EER of the chosen model's own
    embeddings of the training recordings (recomputed here through speechbrain's ``encode_batch``),
    and the chosen epoch is the first with the lowest CV EER. Then a resume with other settings fails."""
    import torch

    from cryid.models.audio import load_audio
    from cryid.models.training.backend import BackendSettings, cross_validated_eer
    from cryid.models.training.speechbrain_io import load_encoder_classifier
    from cryid.models.training.train import TrainError, read_items, train

    settings = _settings(2).model_copy(update={"backend": "none", "val_split": None, "select": "cv"})
    result = train(settings, tiny_set, tmp_path / "run", progress=False)
    history = json.loads((tmp_path / "run" / "train_info.json").read_text())["epochs"]
    cv = [h["train_cv_eer"] for h in history]
    assert len(cv) == 2 and result.metrics["train_cv_eer"] == min(cv)
    assert result.best_epoch == history[cv.index(min(cv))]["epoch"]

    items, _ = read_items(tiny_set, "train")
    clf = load_encoder_classifier(tmp_path / "run")
    embs, labels = [], []
    with torch.no_grad():
        for it in items:
            for f in it.files:
                wav = torch.from_numpy(load_audio(f))[None]
                embs.append(clf.encode_batch(wav, normalize=False)[0, 0].numpy())
                labels.append(it.baby_id)
    assert len(set(labels)) == N_TRAIN_BABIES
    again = cross_validated_eer(np.stack(embs), labels, BackendSettings(kind="center", dims=3))
    assert again == pytest.approx(result.metrics["train_cv_eer"], abs=1e-6)
    with pytest.raises(TrainError, match="other settings"):
        train(settings.model_copy(update={"lr": 0.5}), tiny_set, tmp_path / "run", progress=False)


def test_gmm_branch_is_fitted_on_the_networks_features_of_every_training_file(
    tiny_set: Path, tmp_path: Path
) -> None:
    """``--gmm-components``: the saved branch is the one fitted on the chosen model's normalised features of
    every training recording (recomputed here from the saved speechbrain model), each infant a class."""
    import torch

    from cryid.models.audio import load_audio
    from cryid.models.training.gmm_branch import fit_branch, load_branch
    from cryid.models.training.speechbrain_io import load_encoder_classifier
    from cryid.models.training.train import features, kept_mel_bins, read_items, train

    settings = _settings(1).model_copy(update={"gmm_components": 4, "gmm_dims": 3, "gmm_ubms": 2})
    train(settings, tiny_set, tmp_path / "run", progress=False)
    branch = load_branch(tmp_path / "run")
    assert (branch.components, branch.members, branch.output_dim) == (4, 2, 6)

    items, _ = read_items(tiny_set, "train")
    mods = load_encoder_classifier(tmp_path / "run").mods
    hp = {"compute_features": mods.compute_features, "mean_var_norm": mods.mean_var_norm}
    feats, labels = [], []
    with torch.no_grad():
        for it in items:
            for f in it.files:
                x = torch.from_numpy(load_audio(f))[None]
                feats.append(features(hp, x, torch.ones(1), kept_mel_bins(4000))[0].numpy())
                labels.append(it.baby_id)
    again = fit_branch(feats, labels, 4, 3, seed=settings.seed, members=2)
    for k in range(2):
        np.testing.assert_allclose(branch.ubms[k].means, again.ubms[k].means, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(branch.ldas[k].transform, again.ldas[k].transform, rtol=1e-3, atol=1e-4)


def test_cli_rejects_bad_channels(tiny_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cryid.daemon.cli import main

    rc = main(
        [
            "model",
            "train",
            "--data",
            str(tiny_set),
            "--out",
            str(tmp_path / "x"),
            "--channels",
            "12",
            "--epochs",
            "1",
            "--quiet",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "multiple of 8" in err and "\n" not in err.strip()
    assert not (tmp_path / "x" / "train_info.json").exists()


def test_backend_fit_save_load(tmp_path: Path) -> None:
    """LDA whitens the within-class scatter and keeps the class direction; the npz round-trips."""
    from cryid.models.training.backend import (
        BackendError,
        BackendSettings,
        cross_validated_eer,
        fit_backend,
        load_backend,
    )

    rng = np.random.default_rng(0)
    n_classes, per_class, dim = 40, 3, 12
    centres = rng.normal(size=(n_classes, dim)) * np.r_[3.0, 3.0, np.zeros(dim - 2)]  # identity in dims 0-1
    x = np.repeat(centres, per_class, axis=0) + rng.normal(size=(n_classes * per_class, dim))
    x[:, 5] += 50.0 * rng.normal(size=len(x))  # a loud nuisance dimension, within-class only
    y = np.repeat([f"b{i}" for i in range(n_classes)], per_class)
    be = fit_backend(x, y, BackendSettings(dims=2))
    assert be.transform.shape == (dim, 2)
    # per unit of spread, the loud nuisance dimension weighs far less than the identity dimensions
    assert np.abs(be.transform[5]).max() * 50.0 < 0.6 * np.abs(be.transform[:2]).max() * 3.0
    z = be.apply(x)
    within = np.mean([np.var(z[y == lab], axis=0, ddof=0).mean() for lab in np.unique(y)])
    assert within < 1.0
    assert cross_validated_eer(x, y, BackendSettings(dims=2)) < cross_validated_eer(
        x, y, BackendSettings(kind="center")
    )
    loaded = load_backend(be.save(tmp_path))
    np.testing.assert_allclose(loaded.apply(x[:3]), z[:3], rtol=1e-5, atol=1e-5)
    with pytest.raises(BackendError, match="at least 2 classes"):
        fit_backend(x[:3], ["a"] * 3)


def test_backend_file_is_checked(tmp_path: Path) -> None:
    """One reader of backend.npz (train, export, eval): a bad file is a one-line BackendError."""
    from cryid.models.training.backend import BackendError, load_backend

    with pytest.raises(BackendError, match="back-end file not found"):
        load_backend(tmp_path / "none.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(BackendError, match=r"not a readable \.npz back-end"):
        load_backend(tmp_path / "bad.npz")
    np.savez(tmp_path / "half.npz", mean=np.zeros(3, np.float32))
    with pytest.raises(BackendError, match="needs arrays 'mean'"):
        load_backend(tmp_path / "half.npz")
    nan = np.full(3, np.nan, np.float32)
    np.savez(tmp_path / "nan.npz", mean=nan, transform=np.zeros((3, 2), np.float32))
    with pytest.raises(BackendError, match="NaN or infinite"):
        load_backend(tmp_path / "nan.npz")
    transform = np.eye(3, 2, dtype=np.float32)
    np.savez(tmp_path / "plain.npz", mean=np.ones(3, np.float32), transform=transform)
    plain = load_backend(tmp_path / "plain.npz")
    assert plain.kind is None  # the file does not say; the manifest then says nothing either
    np.testing.assert_array_equal(plain.apply(np.array([2.0, 3.0, 4.0])), [1.0, 2.0])
    again = load_backend(plain.save(tmp_path / "again.npz"))
    assert again.kind is None and again.output_dim == 2


def test_stats_init_computes_band_statistics() -> None:
    """The statistics-initialised ECAPA-TDNN returns the per-band statistics it promises."""
    import torch
    from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN

    from cryid.models.training.train_parts import stats_init

    rng = np.random.default_rng(1)
    logmel = np.maximum(rng.normal(-30.0, 12.0, size=(300, 80)), -60.0).astype(np.float32)
    x = logmel - logmel.mean(axis=0)  # the front end's sentence mean normalisation
    model = ECAPA_TDNN(80, channels=[256] * 4 + [768], lin_neurons=2 * 80 * 4).eval()
    assert stats_init(model, (-5.0, 5.0), framegain_db=(0.0,), delta_db=(3.0,)) == 640
    with torch.no_grad():
        got = model(torch.from_numpy(x)[None])[0, 0].numpy()
    d = np.zeros_like(x)
    d[1:-1] = x[2:] - x[:-2]
    shape = x - x.mean(axis=1, keepdims=True)
    chans = [np.maximum(x + 5, 0), np.maximum(x - 5, 0), np.maximum(shape, 0), np.maximum(d - 3, 0)]
    want = np.concatenate([c.mean(0) for c in chans] + [c.std(0) for c in chans])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-3)


def _bench_module(name: str) -> object:
    """A module of bench/ (the model search harness), imported by path."""
    import importlib
    import sys

    bench = str(Path(__file__).resolve().parents[1] / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module(name)


def test_model_search_statistics_are_the_shipped_network() -> None:
    """bench/model_search.py's NumPy statistics equal the shipped network's (stats_init) pre-LDA output,
    so a back-end chosen there is the one `cryid model train` would fit."""
    import torch
    from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN

    from cryid.models.training.train_parts import stats_init

    parts = _bench_module("search_parts")
    rng = np.random.default_rng(2)
    x = np.maximum(rng.normal(-5.0, 12.0, size=(250, 80)), -70.0).astype(np.float32)  # global-normalised
    model = ECAPA_TDNN(80, channels=[192] * 4 + [576], lin_neurons=1120).eval()
    stats_init(model, (-100.0,), framegain_db=(-100.0, -10.0, 0.0, 10.0), delta_db=(-5.0, 5.0))
    with torch.no_grad():
        got = model(torch.from_numpy(x)[None])[0, 0].numpy()
    np.testing.assert_allclose(parts.shipped_stats(x), got, rtol=1e-4, atol=5e-3)


def test_model_search_weighted_eer_and_channels() -> None:
    """The harness's weighted EER equals the speechbrain-exact EER with unit weights (to one trial), and
    a simulated channel's band limit leaves nothing above its cutoff."""
    from cryid.models.evaluation.metrics import eer

    search = _bench_module("model_search")
    parts = _bench_module("search_parts")
    rng = np.random.default_rng(3)
    pos, neg = rng.normal(1.0, 1.0, 40), rng.normal(0.0, 1.0, 400)
    s = np.concatenate([pos, neg])
    same = np.arange(len(s)) < len(pos)
    assert abs(search.weighted_eer(s, same, np.ones(len(s))) - eer(pos, neg)[0]) <= 1.0 / len(pos)
    # doubling every weight changes nothing; a permuted-label control is near chance
    assert search.weighted_eer(s, same, np.full(len(s), 2.0)) == search.weighted_eer(s, same, np.ones(len(s)))
    assert 0.35 < search.weighted_eer(s, rng.permutation(same), np.ones(len(s))) < 0.65
    wav = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    ch = parts.random_channel(1)  # seed 1: a 3.4 kHz band limit
    assert ch.cutoff_hz in (3400.0, 4000.0)
    ch = parts.Channel(**{**ch.__dict__, "snr_db": float("inf"), "gain_db": 0.0})
    spec = np.abs(np.fft.rfft(parts.apply_channel(wav, ch, noise_seed=0)))
    freqs = np.fft.rfftfreq(16000, 1 / 16000)
    assert spec[freqs > ch.cutoff_hz + 50].max() < 1e-3 * spec[freqs < ch.cutoff_hz].max()
    ward = parts.ward_channel(7)
    np.testing.assert_array_equal(parts.apply_channel(wav, ward, 1), parts.apply_channel(wav, ward, 1))
