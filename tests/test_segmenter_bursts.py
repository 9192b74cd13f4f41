"""Segmenter on bursty ward noise (doors, carts, clatter, speech heard as noise; ``bench/_bursts.py``):
no expirations from the bursts, and real cries among them are still found."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

from bench._bursts import KINDS, ROOM_DBFS, Event, burst, bursty_room, mix_cries, pink
from cryid.models.audio import SAMPLE_RATE, load_audio
from cryid.models.config import SegmenterSettings
from cryid.models.segmenter import VOICED_MAX_APERIODICITY, Expiration, aperiodicity, segment
from tests.fixtures.data import dac_rows

SR = SAMPLE_RATE
SECONDS = 120.0
OFF = SegmenterSettings(min_voiced_fraction=0.0)  # the segmenter before the pitch check


def _on(e: Expiration, events: list[Event]) -> bool:
    return any(v.start < e.end_sample and e.start_sample < v.end for v in events)


def test_aperiodicity_tells_pitch_from_noise() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(2 * 480) / SR
    for f0 in (70.0, 300.0, 450.0, 900.0, 1400.0):  # creaky, typical, high cries (1400 Hz: at 2 periods)
        tone = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 6))
        assert aperiodicity(tone) < 0.1, f0
    for kind in KINDS:
        frames = burst(rng, kind)
        windows = [frames[i : i + 960] for i in range(0, frames.size - 960, 480)]
        voiced = np.mean([aperiodicity(w) < VOICED_MAX_APERIODICITY for w in windows])
        assert voiced < 0.2, f"{kind}: {voiced:.0%} of its windows look pitched"
    assert aperiodicity(rng.standard_normal(960)) > 0.6
    assert aperiodicity(pink(rng, 960)) > 0.6
    assert aperiodicity(np.zeros(960)) == 1.0
    assert aperiodicity(rng.standard_normal(320)) > 0.6  # 10 ms frames: shorter lags, still works


def test_bursty_noise_gives_no_expirations() -> None:
    room, events = bursty_room(np.random.default_rng(5), SECONDS)
    kinds = collections.Counter(v.kind for v in events)
    assert set(kinds) == set(KINDS) and len(events) >= 25, kinds
    before = segment(room, OFF)
    # Without the check, WebRTC VAD calls the bursts voice and nearly every burst becomes an expiration.
    assert len(before) >= len(events) // 2, f"{len(before)} expirations from {len(events)} bursts"
    found = segment(room)
    assert len(found) <= SECONDS / 60, f"{len(found)} expirations from {len(events)} bursts of noise"


@pytest.fixture(scope="module")
def cries(dac_dir: Path) -> list[np.ndarray]:
    """Ten dev recordings spread over the babies (every 14th file), at their recorded level."""
    return [load_audio(dac_dir / r["file_name"]) for r in dac_rows(split="dev")[::14][:10]]


def test_real_cries_among_the_bursts_are_found(cries: list[np.ndarray]) -> None:
    room, _ = bursty_room(np.random.default_rng(6), SECONDS)
    quiet = (pink(np.random.default_rng(7), room.size) * 10 ** (ROOM_DBFS / 20)).astype(np.float32)
    clean_wav, clean_events = mix_cries(np.random.default_rng(8), quiet, cries)
    wav, events = mix_cries(np.random.default_rng(8), room, cries)
    assert [(v.start, v.end) for v in events] == [(v.start, v.end) for v in clean_events]
    clean = [e for e in segment(clean_wav) if _on(e, clean_events)]
    found = segment(wav)
    on = [e for e in found if _on(e, events)]
    clean_s, on_s = sum(e.duration_s for e in clean), sum(e.duration_s for e in on)
    assert len(clean) >= 10, "the recordings must hold crying for the comparison to mean anything"
    # A burst inside a cry can merge two expirations into one, so the count may drop a little, the time not.
    assert len(on) >= 0.7 * len(clean), f"{len(on)} expirations on cries among bursts, {len(clean)} alone"
    assert on_s >= 0.85 * clean_s, f"{on_s:.1f} s of cry found among bursts, {clean_s:.1f} s alone"
    assert len(found) - len(on) <= 1, f"{len(found) - len(on)} expirations outside the cries"
