"""The NumPy front end vs speechbrain: Fbank(n_mels=80) + InputNormalization(std_norm=False).

Sentence normalisation (the CryCeleb recipe) and global normalisation (a fixed per-band mean).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryid.models.audio import load_audio
from cryid.models.frontend import Fbank
from cryid.models.manifest import FrontendParams
from tests.fixtures.data import dac_rows

torch = pytest.importorskip("torch", reason="speechbrain reference needs the `train` extra")
sb_features = pytest.importorskip("speechbrain.lobes.features")
sb_processing = pytest.importorskip("speechbrain.processing.features")

# Features are dB values spanning about 80 dB; float32 FFTs (torch vs scipy) differ by ~1e-3 dB.
MAX_ABS_DIFF_DB = 0.01


@pytest.fixture(scope="module")
def reference():
    fbank = sb_features.Fbank(n_mels=80)
    norm = sb_processing.InputNormalization(norm_type="sentence", std_norm=False)

    def run(wav: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            raw = fbank(torch.from_numpy(wav)[None])
            return raw[0].numpy(), norm(raw, torch.ones(1))[0].numpy()

    # One thread: on a shared 2-core machine torch's OpenMP pool is far slower with two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield run
    torch.set_num_threads(threads)


def test_every_dev_file_matches_speechbrain(dac_dir: Path, reference) -> None:
    frontend = Fbank()
    rows = dac_rows("dev")
    assert len(rows) >= 100
    worst_raw = worst_norm = 0.0
    for row in rows:
        wav = load_audio(dac_dir / row["file_name"])
        ref_raw, ref_norm = reference(wav)
        ours = frontend.features(wav)
        assert ours.shape == ref_norm.shape == (frontend.n_frames(len(wav)), 80)
        assert ours.dtype == np.float32
        worst_raw = max(worst_raw, float(np.abs(frontend.log_mel(wav) - ref_raw).max()))
        worst_norm = max(worst_norm, float(np.abs(ours - ref_norm).max()))
    print(
        f"\nfront end vs speechbrain on {len(rows)} dev files: max abs diff "
        f"{worst_raw:.2e} dB (Fbank), {worst_norm:.2e} dB (after sentence normalisation)"
    )
    assert worst_norm < MAX_ABS_DIFF_DB
    assert worst_raw < MAX_ABS_DIFF_DB


def test_mel_matrix_equals_speechbrain_filterbank() -> None:
    from cryid.models.frontend import mel_matrix

    fb = sb_features.Fbank(n_mels=80).compute_fbanks
    f_c = fb.f_central.repeat(fb.all_freqs_mat.shape[1], 1).transpose(0, 1)
    band = fb.band.repeat(fb.all_freqs_mat.shape[1], 1).transpose(0, 1)
    ref = fb._create_fbank_matrix(f_c, band).numpy()
    # speechbrain builds it in float32, cryid in float64: equal to float32 rounding.
    assert np.abs(mel_matrix(FrontendParams()) - ref).max() < 5e-5


@pytest.mark.parametrize("n_samples", [1, 159, 160, 401, 4000, 16001])
def test_lengths_and_top_db_clipping_match(n_samples: int, reference) -> None:
    # Mostly silence with one click: the top_db floor (max - 80 dB) and the amin clamp both act.
    wav = np.zeros(n_samples, dtype=np.float32)
    wav[n_samples // 2] = 0.5
    ref_raw, ref_norm = reference(wav)
    frontend = Fbank()
    assert np.abs(frontend.log_mel(wav) - ref_raw).max() < MAX_ABS_DIFF_DB
    assert np.abs(frontend.features(wav) - ref_norm).max() < MAX_ABS_DIFF_DB


def test_batch_of_mixed_lengths_equals_single_clips() -> None:
    rng = np.random.default_rng(3)
    clips = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (4000, 16000, 16000, 23456)]
    frontend = Fbank()
    batch = frontend.features_batch(clips)
    for clip, feats in zip(clips, batch, strict=True):
        np.testing.assert_array_equal(feats, frontend.features(clip))
    assert [f.shape[0] for f in batch] == [26, 101, 101, 147]


def test_rejects_multichannel_input() -> None:
    with pytest.raises(ValueError, match="1-D mono"):
        Fbank().features(np.zeros((2, 16000), dtype=np.float32))


def test_module_helpers_and_keyword_construction() -> None:
    from cryid.models.frontend import features, features_batch

    wav = (0.1 * np.random.default_rng(4).standard_normal(8000)).astype(np.float32)
    np.testing.assert_array_equal(features(wav), Fbank(n_mels=80).features(wav))
    assert [f.shape for f in features_batch([wav, wav[:4000]])] == [(51, 80), (26, 80)]
    assert Fbank(n_mels=40).features(wav).shape == (51, 40)
    with pytest.raises(ValueError, match="not both"):
        Fbank(FrontendParams(), n_mels=40)


def test_global_mean_normalization_matches_speechbrain() -> None:
    """norm_type global (std_norm=False): one fixed per-band mean subtracted, as speechbrain does."""
    rng = np.random.default_rng(5)
    mean = tuple(float(v) for v in rng.uniform(-45.0, -20.0, 80))
    norm = sb_processing.InputNormalization(norm_type="global", std_norm=False)
    norm.glob_mean = torch.tensor(mean, dtype=torch.float32)
    norm.glob_std = torch.ones(80)
    norm.count = 1000
    norm.eval()
    wav = (0.1 * rng.standard_normal(12000)).astype(np.float32)
    frontend = Fbank(FrontendParams(normalization="global_mean", global_mean=mean))
    with torch.no_grad():
        raw = sb_features.Fbank(n_mels=80)(torch.from_numpy(wav)[None])
        ref = norm(raw, torch.ones(1))[0].numpy()
    assert np.abs(frontend.features(wav) - ref).max() < MAX_ABS_DIFF_DB
    # a louder clip keeps its level (sentence normalisation would remove it)
    louder = frontend.features(4.0 * wav) - frontend.features(wav)
    np.testing.assert_allclose(louder, 20.0 * np.log10(4.0), atol=0.01)


def test_global_mean_must_fit_the_bands() -> None:
    with pytest.raises(ValueError, match="needs global_mean with 80 values"):
        FrontendParams(normalization="global_mean", global_mean=(0.0,) * 40)
    with pytest.raises(ValueError, match="needs global_mean"):
        FrontendParams(normalization="global_mean")
    with pytest.raises(ValueError, match="normalization is not global_mean"):
        FrontendParams(global_mean=(0.0,) * 80)
