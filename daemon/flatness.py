"""A dead or flat microphone: digital silence, a constant value or a clipped flat line.

A capture device can stay open after a reboot or a driver hiccup and deliver nothing but zeros, a
stuck DC value or a rail (+-1.0). A real microphone in a quiet room still has a noise floor of many
LSB, so "flat" means the peak-to-peak range of every chunk stays within ``FLAT_PTP`` (4 LSB of 16-bit
audio). After ``timeout_s`` of flat audio the state becomes ``flat``; the first chunk that is not flat
makes it ``ok`` again. A plain synchronous stage: the service feeds it every chunk.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal

import numpy as np

FLAT_PTP = 4.0 / 32768.0  # peak-to-peak at or below this (full scale 1.0) is no signal at all

FlatState = Literal["ok", "flat"]


class FlatDetector:
    """Feeds on chunks; reports ``ok`` / ``flat`` changes and the recent input level."""

    def __init__(self, timeout_s: float, sample_rate: int, level_window_s: float = 1.0) -> None:
        if timeout_s <= 0:
            raise ValueError("source.flat_timeout_s must be > 0")
        self.timeout_samples = round(timeout_s * sample_rate)
        self.sample_rate = sample_rate
        self.state: FlatState = "ok"
        self.flat_samples = 0  # consecutive flat samples so far
        self.flat_value: float | None = None  # the constant the flat run sits at
        self._window = max(1, int(level_window_s * sample_rate))
        self._level: deque[tuple[int, float]] = deque()  # (n, sum of squares) of recent chunks
        self._level_n = 0
        self._level_sumsq = 0.0

    @property
    def flat_s(self) -> float:
        return self.flat_samples / self.sample_rate

    def level_dbfs(self) -> float | None:
        """RMS level of about the last ``level_window_s`` of audio, dBFS (floor -120); None before audio."""
        if self._level_n == 0:
            return None
        ms = self._level_sumsq / self._level_n
        return max(-120.0, 10.0 * math.log10(ms + 1e-12))

    def process(self, samples: np.ndarray) -> FlatState | None:
        """Take one chunk; returns the new state when it changed, else None."""
        x = np.asarray(samples, dtype=np.float32)
        if x.size == 0:
            return None
        self._add_level(x)
        lo, hi = float(x.min()), float(x.max())
        if hi - lo <= FLAT_PTP and (self.flat_value is None or abs(lo - self.flat_value) <= FLAT_PTP):
            if self.flat_value is None:
                self.flat_value = lo
            self.flat_samples += int(x.size)
            if self.state == "ok" and self.flat_samples >= self.timeout_samples:
                self.state = "flat"
                return "flat"
            return None
        self.flat_samples = 0
        self.flat_value = None
        if self.state == "flat":
            self.state = "ok"
            return "ok"
        return None

    def describe(self) -> str:
        """What the flat line looks like, for the log: silence, a constant or a clipped rail."""
        v = self.flat_value if self.flat_value is not None else 0.0
        if abs(v) <= FLAT_PTP:
            kind = "digital silence"
        elif abs(v) >= 1.0 - FLAT_PTP:
            kind = f"clipped flat line at {v:+.3f}"
        else:
            kind = f"constant value {v:+.5f}"
        return f"{kind} for {self.flat_s:.0f} s"

    def _add_level(self, x: np.ndarray) -> None:
        sumsq = float(np.dot(x, x))
        self._level.append((int(x.size), sumsq))
        self._level_n += int(x.size)
        self._level_sumsq += sumsq
        while len(self._level) > 1 and self._level_n - self._level[0][0] >= self._window:
            n, s = self._level.popleft()
            self._level_n -= n
            self._level_sumsq -= s
