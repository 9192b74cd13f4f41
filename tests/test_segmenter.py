"""Segmenter: streaming invariance and plausible expirations on real cries; silence and noise give none."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from cryid.models.audio import SAMPLE_RATE, AudioError, load_audio
from cryid.models.config import SegmenterSettings
from cryid.models.segmenter import Expiration, Segmenter, segment
from pydantic import ValidationError

from tests.fixtures.data import dac_rows

SR = SAMPLE_RATE


def _stream(wav: np.ndarray, chunk: int, settings: SegmenterSettings | None = None) -> list[Expiration]:
    seg = Segmenter(settings)
    out: list[Expiration] = []
    for i in range(0, wav.size, chunk):
        out += seg.process(wav[i : i + chunk])
    return out + seg.flush()


@pytest.fixture(scope="module")
def dev_cries(dac_dir: Path) -> list[np.ndarray]:
    """Every dev recording of donateacry-cc (142 phone recordings of about 7 s)."""
    return [load_audio(dac_dir / r["file_name"]) for r in dac_rows(split="dev")]


def test_chunk_size_invariance_on_real_cries(dev_cries: list[np.ndarray]) -> None:
    wav = np.concatenate(dev_cries[:16])  # about 110 s of real crying, pauses and room noise
    whole = segment(wav)
    assert len(whole) >= 10, "real crying must give expirations for the comparison to mean anything"
    for chunk in (160, 512, SR, 4999):  # 10 ms, 32 ms, 1 s, and an odd size
        streamed = _stream(wav, chunk)
        assert [(e.start_sample, e.end_sample) for e in streamed] == [
            (e.start_sample, e.end_sample) for e in whole
        ], f"chunks of {chunk} samples changed the expirations"
        for a, b in zip(streamed, whole, strict=True):
            np.testing.assert_array_equal(a.audio, b.audio)
            assert a.level_dbfs == b.level_dbfs
    for e in whole:  # the audio is the stream's samples at the stated indices
        np.testing.assert_array_equal(e.audio, wav[e.start_sample : e.end_sample])


def test_real_recordings_give_plausible_expirations(
    dev_cries: list[np.ndarray], capsys: pytest.CaptureFixture[str]
) -> None:
    settings = SegmenterSettings()
    per_file = [segment(w, settings) for w in dev_cries]
    counts = np.array([len(e) for e in per_file])
    lengths = np.array([e.duration_s for es in per_file for e in es])
    pct = np.percentile(lengths, [5, 25, 50, 75, 95])
    hist = np.bincount(counts)
    with capsys.disabled():
        print(f"\n[segmenter] donateacry-cc dev: {len(dev_cries)} recordings, {lengths.size} expirations")
        print("[segmenter] expirations per file: " + ", ".join(f"{k}:{n}" for k, n in enumerate(hist) if n))
        print(
            "[segmenter] length s p5/p25/p50/p75/p95: "
            + "/".join(f"{p:.2f}" for p in pct)
            + f", max {lengths.max():.2f}; share 0.5-1.0 s {np.mean((lengths >= 0.5) & (lengths <= 1.0)):.0%}"
        )
    # Counts: a 7 s recording holds a handful of expirations, never dozens; most recordings hold crying.
    assert np.mean(counts >= 1) >= 0.75
    assert counts.max() <= 12
    assert 2.0 <= np.median(counts) <= 6.0
    # Lengths: CryCeleb's hand-cut expirations mostly last 0.5-1.0 s.
    assert 0.45 <= pct[2] <= 1.2
    assert lengths.min() >= settings.min_expiration_ms / 1000
    assert lengths.max() <= settings.max_expiration_ms / 1000
    assert np.mean(lengths > 2.0) <= 0.15


def test_silence_and_white_noise_give_nothing_and_skip_the_vad() -> None:
    rng = np.random.default_rng(7)
    minute = 60 * SR
    cases = {
        "digital silence": np.zeros(minute, np.float32),
        "quiet white noise (-50 dBFS)": rng.normal(0, 10 ** (-50 / 20), minute).astype(np.float32),
        "loud white noise (-20 dBFS)": rng.normal(0, 10 ** (-20 / 20), minute).astype(np.float32),
        "silence, then noise starts": np.concatenate([np.zeros(5 * SR), rng.normal(0, 0.03, 30 * SR)]).astype(
            np.float32
        ),
    }
    for name, wav in cases.items():
        seg = Segmenter()
        found = seg.process(wav) + seg.flush()
        assert found == [], f"{name}: {len(found)} expirations"
        # the gate keeps steady audio away from the VAD: at most a few frames at the start/onset
        assert seg.frames_vad <= 0.01 * seg.frames_total, f"{name}: {seg.frames_vad} frames reached the VAD"


def _harmonic_cry(seconds: float, f0: float = 450.0, level: float = 0.2) -> np.ndarray:
    """A synthetic cry-like tone: harmonics of a slowly wavering f0."""
    t = np.arange(int(seconds * SR)) / SR
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))) / SR
    wav = sum(np.sin(k * phase) / k for k in range(1, 8))
    return (level * wav / np.max(np.abs(wav))).astype(np.float32)


def test_over_long_expirations_are_split(dev_cries: list[np.ndarray]) -> None:
    wav = np.concatenate(dev_cries[:16])
    plain = segment(wav, SegmenterSettings())
    short = SegmenterSettings(max_expiration_ms=800)
    split = segment(wav, short)
    assert max(e.duration_s for e in plain) > 0.8, "the comparison needs expirations longer than 0.8 s"
    assert all(e.duration_s <= 0.8 for e in split)
    assert len(split) > len(plain)
    for a, b in itertools.pairwise(split):
        assert a.end_sample <= b.start_sample, "split pieces must not overlap"
    # splitting loses at most the pieces shorter than min_expiration_ms
    assert sum(e.duration_s for e in split) >= 0.8 * sum(e.duration_s for e in plain)


def test_short_bursts_are_dropped_long_ones_kept() -> None:
    rng = np.random.default_rng(3)
    settings = SegmenterSettings()
    noise = lambda s: rng.normal(0, 0.002, int(s * SR)).astype(np.float32)  # noqa: E731
    wav = np.concatenate([noise(2), _harmonic_cry(0.1), noise(2), _harmonic_cry(0.8), noise(2)])
    found = segment(wav, settings)
    assert len(found) == 1, [(e.start_s, e.duration_s) for e in found]
    onset = 4.1 * SR
    assert onset - SR // 10 <= found[0].start_sample <= onset  # starts at the onset, with pre-roll
    assert 0.7 <= found[0].duration_s <= 1.2


def test_reset_starts_a_new_stream(dev_cries: list[np.ndarray]) -> None:
    seg = Segmenter()
    first = seg.process(dev_cries[3]) + seg.flush()
    seg.reset()
    again = seg.process(dev_cries[3]) + seg.flush()
    assert [(e.start_sample, e.end_sample) for e in first] == [(e.start_sample, e.end_sample) for e in again]


def test_bad_input_and_settings() -> None:
    with pytest.raises(AudioError, match="mono"):
        Segmenter().process(np.zeros((100, 2), np.float32))
    with pytest.raises(AudioError, match="16000"):
        Segmenter(sample_rate=44100)
    with pytest.raises(ValidationError, match="frame_ms"):
        SegmenterSettings(frame_ms=25)
    with pytest.raises(ValidationError, match="vad_aggressiveness"):
        SegmenterSettings(vad_aggressiveness=4)
    assert segment(np.zeros(0, np.float32)) == []
