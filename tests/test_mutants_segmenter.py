"""Segmenter behaviour that mutation testing showed unchecked (bench/mutation.py models/segmenter.py).

Public API only: ``level_dbfs``, ``NoiseFloor``, ``Segmenter`` (``process``, ``flush``, its counters
``frames_vad`` and ``vad_resets``) and ``segment``; real cries where the VAD must hear a baby, a
synthetic harmonic tone where exact frame counts matter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryid.models.audio import SAMPLE_RATE, AudioError, load_audio
from cryid.models.config import SegmenterSettings
from cryid.models.segmenter import NoiseFloor, Segmenter, level_dbfs, segment
from tests.fixtures.data import dac_rows
from tests.test_segmenter import _harmonic_cry

SR = SAMPLE_RATE


def test_level_dbfs_of_audio_and_of_nothing() -> None:
    t = np.arange(SR) / SR
    assert level_dbfs(np.ones(SR, np.float32)) == pytest.approx(0.0, abs=1e-6)  # full scale
    assert level_dbfs(np.sin(2 * np.pi * 440 * t).astype(np.float32)) == pytest.approx(-3.01, abs=0.01)
    assert level_dbfs(0.01 * np.ones(100, np.float32)) == pytest.approx(-40.0, abs=1e-4)
    assert level_dbfs(np.zeros(0, np.float32)) == -100.0
    assert level_dbfs(np.zeros(10, np.float32)) == -100.0


def test_noise_floor_follows_the_chosen_percentile_of_its_window() -> None:
    """The median (percentile 50) of a three-frame window, free to climb (100 dB a frame) and falling
    at once; digital silence does not count."""
    floor = NoiseFloor(window_frames=3, percentile=50.0, clamp_dbfs=-100.0, rise_db=100.0, fast_rise_db=100.0)
    assert floor.value == -100.0
    for level, expected in ((-50.0, -50.0), (-40.0, -50.0), (-30.0, -40.0), (-20.0, -30.0), (-60.0, -30.0)):
        floor.update(level)
        assert floor.value == expected, level
    floor.update(-200.0)  # digital silence: the window is [-20, -60, silence]
    assert floor.value == -60.0
    floor.reset()
    assert floor.value == -100.0


def test_an_unsupported_sample_rate_is_one_line_naming_the_fix() -> None:
    with pytest.raises(
        AudioError, match=r"^segmenter sample rate 44100 Hz unsupported; resample to 16000 Hz$"
    ):
        Segmenter(sample_rate=44100)


def _bursts(n: int, pause_s: float = 2.0) -> np.ndarray:
    """``n`` cry-like tones of 0.8 s, each after ``pause_s`` of a quiet room (-75 dBFS)."""
    rng = np.random.default_rng(5)
    room = lambda s: rng.normal(0, 10 ** (-75 / 20), int(s * SR)).astype(np.float32)  # noqa: E731
    parts = []
    for k in range(n):
        parts += [room(pause_s), _harmonic_cry(0.8, f0=420.0 + 30 * k)]
    return np.concatenate([*parts, room(pause_s)])


def test_the_vad_is_renewed_once_per_pause_outside_an_expiration() -> None:
    """WebRTC VAD is made anew when the gate shuts outside an expiration (so it never grows deaf):
    silence alone renews nothing; each tone the gate let through, followed by a pause, renews it once
    (whether or not the VAD took it for a cry)."""
    seg = Segmenter()
    assert seg.process(np.zeros(10 * SR, np.float32)) == [] and seg.vad_resets == 0
    seg = Segmenter()
    found = seg.process(_bursts(3)) + seg.flush()
    assert found, "the VAD must hear the tones as cries for the renewals to mean anything"
    assert seg.vad_resets == 3
    seg.reset()
    assert seg.vad_resets == 0
    assert seg.process(np.zeros(10 * SR, np.float32)) == [] and seg.vad_resets == 0


def test_one_frame_of_split_search_cuts_at_the_last_frame() -> None:
    """``split_search_ms`` of one frame (30 ms): an over-long cry is cut one frame before
    ``max_expiration_ms``, every time."""
    settings = SegmenterSettings(max_expiration_ms=600, split_search_ms=30, min_level_span_db=0.0)
    found = segment(np.concatenate([np.zeros(SR, np.float32), _harmonic_cry(4.0)]), settings)
    assert len(found) >= 5
    assert [round(e.duration_s, 3) for e in found[:-1]] == [0.57] * (len(found) - 1)


def test_a_hangover_shorter_than_a_frame_is_one_frame(dac_dir: Path) -> None:
    """``hangover_ms`` 0 and 30 (one 30 ms frame either way) cut real crying identically; 60 ms (two
    frames) bridges one-frame dips, so it cuts it differently."""
    wav = np.concatenate([load_audio(dac_dir / r["file_name"]) for r in dac_rows(split="dev")[:6]])

    def spans(hangover_ms: int) -> list[tuple[int, int]]:
        return [
            (e.start_sample, e.end_sample) for e in segment(wav, SegmenterSettings(hangover_ms=hangover_ms))
        ]

    zero = spans(0)
    assert len(zero) >= 10
    assert spans(30) == zero
    assert spans(60) != zero


def test_an_expiration_reports_the_level_of_its_audio() -> None:
    """``level_dbfs`` of an expiration is the energy mean of its frames: for a tone well above the
    high-pass, the level of the audio it carries."""
    found = segment(_bursts(2))
    assert found
    for e in found:
        assert e.level_dbfs == pytest.approx(level_dbfs(e.audio), abs=0.5), (e.start_s, e.level_dbfs)
        assert -30.0 < e.level_dbfs < -10.0


def test_intermittent_hiss_stops_reaching_the_vad_within_seconds() -> None:
    """Hiss above 4 kHz (-45 dBFS) in 1.5 s bursts with dropouts (digital silence) between them: the
    gate is never open 2 s in a row (``steady_after_ms``), but once it has let through 1 s
    (``noise_after_ms``) without a cry frame the floor climbs fast, so the hiss stops reaching the VAD
    within about 2 s; with the slow climb alone it would take over 6 s."""
    from scipy.signal import butter, lfilter

    rng = np.random.default_rng(9)
    b, a = butter(4, 4000 / (SR / 2), btype="high")

    def hiss(seconds: float) -> np.ndarray:
        x = lfilter(b, a, rng.normal(0, 1, int(seconds * SR)))
        return (x / np.sqrt(np.mean(x**2)) * 10 ** (-45 / 20)).astype(np.float32)

    gap = np.zeros(int(0.3 * SR), np.float32)
    wav = np.concatenate([p for _ in range(10) for p in (hiss(1.5), gap)])
    seg = Segmenter()
    assert seg.process(wav) + seg.flush() == []
    reached_s = seg.frames_vad * seg.settings.frame_ms / 1000
    assert reached_s <= 3.0, f"the hiss reached the VAD for {reached_s:.1f} s"


def test_gate_shut_s_is_the_quiet_time_since_the_gate_last_opened() -> None:
    """How long the room has been quiet (the daemon reads larger blocks after a while of it): it grows
    with each shut frame, is 0 while an expiration is open, and starts again after a cry."""
    rng = np.random.default_rng(7)
    room = lambda s: rng.normal(0, 10 ** (-75 / 20), int(s * SR)).astype(np.float32)  # noqa: E731
    seg = Segmenter()
    assert seg.gate_shut_s == 0.0
    seg.process(room(3.0))
    assert seg.gate_shut_s == pytest.approx(3.0, abs=0.011)
    seg.process(room(1.0))
    assert seg.gate_shut_s == pytest.approx(4.0, abs=0.011)
    seg.process(_harmonic_cry(0.8, f0=450.0))
    assert seg.gate_shut_s == 0.0  # an expiration is open
    expirations = seg.process(room(2.0))
    assert len(expirations) == 1  # closed by the quiet after it
    assert 1.5 <= seg.gate_shut_s <= 2.0  # counted from the cry's last loud frame, not from the start
