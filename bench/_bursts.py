"""Bursty ward noise without a cry, and the same with real cries mixed in (shared by ``bench/bursts.py``
and ``tests/test_segmenter_bursts.py``; not part of cryid). Plain, seeded NumPy: a seed gives one stream.

The room is quiet pink noise (``ROOM_DBFS``); on it, every ``gap_s`` seconds or so, one burst shorter than
2 s of one of the ward's non-cry sounds, at the level a phone near a cot hears them:
- ``broadband``: a burst of pink noise with soft edges (a cart, a trolley, rustling, a tap running);
- ``slam``: an impulse with an exponential decay through a room resonance (a door, a drawer, a dropped
  tray), a few of them close together for clatter;
- ``speech``: pink noise shaped by formant-like band-passes and a 4-5 Hz syllable envelope (adult speech
  heard as noise, the case that WebRTC VAD is built to accept).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SR = 16000
ROOM_DBFS = -60.0
KINDS = ("broadband", "slam", "speech")


@dataclass(frozen=True)
class Event:
    """One burst or cry in a generated stream (samples)."""

    kind: str
    start: int
    end: int


def _scale(x: np.ndarray, dbfs: float) -> np.ndarray:
    return x / np.sqrt(np.mean(np.square(x, dtype=np.float64)) + 1e-20) * 10 ** (dbfs / 20)


def pink(rng: np.random.Generator, n: int) -> np.ndarray:
    """Pink (1/f power) noise of unit RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(spec.size, dtype=np.float64)
    f[0] = 1.0
    x = np.fft.irfft(spec / np.sqrt(f), n)
    return _scale(x, 0.0)


def _bandpass(rng: np.random.Generator, x: np.ndarray, centres: list[float], width_hz: float) -> np.ndarray:
    """Sum of Gaussian band-passes in the frequency domain (formants, resonances)."""
    spec = np.fft.rfft(x)
    f = np.fft.rfftfreq(x.size, 1 / SR)
    gain = sum(np.exp(-0.5 * ((f - c) / width_hz) ** 2) for c in centres)
    return np.fft.irfft(spec * gain, x.size)


def _edges(n: int, ramp: int) -> np.ndarray:
    env = np.ones(n)
    ramp = min(ramp, n // 2)
    if ramp:
        env[:ramp] = np.linspace(0, 1, ramp)
        env[-ramp:] = np.linspace(1, 0, ramp)
    return env


def burst(rng: np.random.Generator, kind: str) -> np.ndarray:
    """One non-cry sound under 2 s, at a realistic level for a phone near a cot (RMS -35 to -15 dBFS)."""
    if kind == "broadband":
        n = int(rng.uniform(0.3, 1.8) * SR)
        x = pink(rng, n) * _edges(n, int(rng.uniform(0.02, 0.2) * SR))
        return _scale(x, rng.uniform(-35, -20))
    if kind == "slam":
        hits = []
        for _ in range(int(rng.integers(1, 4))):  # one slam, or a short clatter
            n = int(rng.uniform(0.15, 0.6) * SR)
            tau = rng.uniform(0.03, 0.15)
            hit = rng.standard_normal(n) * np.exp(-np.arange(n) / (tau * SR))
            hit = _bandpass(rng, hit, list(rng.uniform(80, 3000, size=3)), rng.uniform(50, 400)) + 0.3 * hit
            hits.append(_scale(hit, rng.uniform(-25, -12)) * 10 ** (rng.uniform(-6, 0) / 20))
            hits.append(np.zeros(int(rng.uniform(0.0, 0.25) * SR)))
        return np.concatenate(hits)
    if kind == "speech":
        n = int(rng.uniform(0.5, 1.9) * SR)
        t = np.arange(n) / SR
        syllables = 0.5 * (1 + np.sin(2 * np.pi * rng.uniform(3.5, 5.5) * t + rng.uniform(0, 2 * np.pi)))
        x = _bandpass(rng, pink(rng, n), [rng.uniform(300, 800), rng.uniform(900, 2200), 2800.0], 150.0)
        return _scale(x * syllables**1.5 * _edges(n, SR // 50), rng.uniform(-35, -22))
    raise ValueError(f"unknown burst kind {kind!r}; use one of {KINDS}")


def bursty_room(
    rng: np.random.Generator, seconds: float, gap_s: tuple[float, float] = (1.0, 4.0)
) -> tuple[np.ndarray, list[Event]]:
    """``seconds`` of a quiet room with a non-cry burst every ``gap_s`` seconds; no cry at all."""
    n = int(seconds * SR)
    wav = _scale(pink(rng, n), ROOM_DBFS)
    events: list[Event] = []
    pos = int(rng.uniform(*gap_s) * SR)
    while True:
        kind = KINDS[int(rng.integers(len(KINDS)))]
        b = burst(rng, kind)
        if pos + b.size > n:
            break
        wav[pos : pos + b.size] += b
        events.append(Event(kind, pos, pos + b.size))
        pos += b.size + int(rng.uniform(*gap_s) * SR)
    return wav.astype(np.float32), events


def mix_cries(
    rng: np.random.Generator, room: np.ndarray, cries: list[np.ndarray], gain_db: float = 0.0
) -> tuple[np.ndarray, list[Event]]:
    """``room`` with the recordings ``cries`` added one after another at random places, at their recorded
    level (phones held near the baby) raised by ``gain_db``."""
    wav = room.astype(np.float64).copy()
    total = sum(c.size for c in cries)
    spare = wav.size - total
    if spare < 0:
        raise ValueError(f"{total / SR:.0f} s of cries do not fit in {wav.size / SR:.0f} s of room")
    gaps = rng.dirichlet(np.ones(len(cries) + 1)) * spare
    events: list[Event] = []
    pos = 0
    for gap, cry in zip(gaps, cries, strict=False):
        pos += int(gap)
        wav[pos : pos + cry.size] += cry * 10 ** (gain_db / 20)
        events.append(Event("cry", pos, pos + cry.size))
        pos += cry.size
    return np.clip(wav, -1.0, 1.0).astype(np.float32), events
