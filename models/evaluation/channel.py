"""One simulated ward channel: the room, the microphone and the noise every baby of a ward shares.

``cryid eval --ward-channel SEED`` passes every recording of the split through one ``WardChannel``, so
cues of the recording (the phone, its codec, the room of the original recording) no longer tell two
babies apart more than they would on a ward, where one microphone hears every cot. From the seed:

- **room**: a shoe-box nursery (4-9 x 3-7 x 2.6-3.2 m, RT60 0.2-0.7 s) simulated by the
  image-source method of ``pyroomacoustics`` (imported lazily; the ``train`` extra), a cot at 0.3-3 m
  from the microphone; the impulse response is scaled so its direct sound keeps the recording's level
  up to 1 m and falls as 1/r beyond;
- **microphone**: a linear-phase FIR with a random spectral tilt (-3..+3 dB per octave around 1 kHz),
  three random peaks or dips (-8..+8 dB), a 60-150 Hz high-pass and a band limit (3.4, 4, 6 or 8 kHz);
- **noise**: one noise colour (a random spectral slope) at one SNR (0-30 dB by default) against the
  recording's mean power; each recording's noise samples are seeded by its file id, so the same file
  always gets the same noise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from scipy import signal

VERSION = 1  # part of the cache key: bump when the simulation changes


@dataclass(frozen=True)
class ChannelParams:
    """What the seed chose (for the report)."""

    room_m: tuple[float, float, float]
    rt60_s: float
    distance_m: float
    tilt_db_per_octave: float
    band_limit_hz: float
    highpass_hz: float
    snr_db: float
    noise_slope: float


class WardChannel:
    """``apply(wav, key)``: a recording as the ward's microphone hears it (see the module docstring)."""

    def __init__(
        self, seed: int, sample_rate: int = 16000, snr_db: tuple[float, float] = (0.0, 30.0)
    ) -> None:
        self.seed = int(seed)
        self.sample_rate = int(sample_rate)
        rng = np.random.default_rng([self.seed, 20261202])
        room = (float(rng.uniform(4, 9)), float(rng.uniform(3, 7)), float(rng.uniform(2.6, 3.2)))
        rt60 = float(rng.uniform(0.2, 0.7))
        distance = float(rng.uniform(0.3, 3.0))
        self._rir = self._room_response(rng, room, rt60, distance)
        tilt = float(rng.uniform(-3, 3))
        band = float(rng.choice([3400.0, 4000.0, 6000.0, 8000.0]))
        highpass = float(rng.uniform(60, 150))
        peaks = [
            (
                float(rng.uniform(np.log(200), np.log(6000))),
                float(rng.uniform(-8, 8)),
                float(rng.uniform(0.15, 0.5)),
            )
            for _ in range(3)
        ]
        self._mic = self._mic_response(tilt, band, highpass, peaks)
        self._snr_db = float(rng.uniform(*snr_db))
        self._noise_slope = float(rng.uniform(-1.5, 0.0))  # power ~ f^slope: white (0) to reddish
        self.params = ChannelParams(
            room, rt60, distance, tilt, band, highpass, self._snr_db, self._noise_slope
        )

    @property
    def key(self) -> str:
        """Identifies the simulation in cache keys."""
        return f"ward-channel-v{VERSION}:{self.seed}:{self.sample_rate}"

    def describe(self) -> str:
        p = self.params
        return (
            f"ward channel {self.seed}: room {p.room_m[0]:.1f}x{p.room_m[1]:.1f}x{p.room_m[2]:.1f} m, "
            f"RT60 {p.rt60_s:.2f} s, cot at {p.distance_m:.2f} m; microphone tilt "
            f"{p.tilt_db_per_octave:+.1f} dB/oct, {p.highpass_hz:.0f}-{p.band_limit_hz:.0f} Hz; "
            f"noise at {p.snr_db:.1f} dB SNR"
        )

    def _room_response(
        self, rng: np.random.Generator, room: tuple[float, float, float], rt60: float, distance: float
    ) -> np.ndarray:
        import pyroomacoustics as pra

        absorption, max_order = pra.inverse_sabine(rt60, list(room))
        shoebox = pra.ShoeBox(
            list(room), fs=self.sample_rate, materials=pra.Material(absorption), max_order=min(max_order, 12)
        )
        mic = np.array([float(rng.uniform(0.5, room[0] - 0.5)), float(rng.uniform(0.5, room[1] - 0.5)), 1.8])
        for _ in range(1000):  # a cot at `distance`, inside the room, at cot height
            angle = rng.uniform(0, 2 * np.pi)
            horizontal = np.sqrt(max(distance**2 - 0.9**2, 0.0))
            src = mic + np.array(
                [
                    horizontal * np.cos(angle),
                    horizontal * np.sin(angle),
                    -0.9 if distance > 0.9 else -distance,
                ]
            )
            if 0.2 < src[0] < room[0] - 0.2 and 0.2 < src[1] < room[1] - 0.2:
                break
        else:
            src = np.array([room[0] / 2, room[1] / 2, 0.9])
        shoebox.add_source(src.tolist())
        shoebox.add_microphone(mic.tolist())
        shoebox.compute_rir()
        rir = np.asarray(shoebox.rir[0][0], dtype=np.float64)
        peak = int(np.argmax(np.abs(rir)))
        direct = float(np.sqrt(np.sum(rir[max(peak - 40, 0) : peak + 41] ** 2)))
        return rir / max(direct, 1e-12) / max(distance, 1.0)  # the direct sound at 1/r of its 1 m level

    def _mic_response(
        self, tilt: float, band: float, highpass: float, peaks: list[tuple[float, float, float]]
    ) -> np.ndarray:
        nyq = self.sample_rate / 2
        f = np.linspace(0, nyq, 257)
        logf = np.log(np.maximum(f, 20.0))
        gain_db = tilt * np.log2(np.maximum(f, 20.0) / 1000.0)
        for centre, g, width in peaks:
            gain_db += g * np.exp(-0.5 * ((logf - centre) / width) ** 2)
        gain = 10 ** (gain_db / 20)
        gain *= 1 / np.sqrt(1 + (highpass / np.maximum(f, 1e-3)) ** 8)  # 4th-order-like high-pass
        if band < nyq:
            gain *= 1 / np.sqrt(1 + (f / band) ** 24)  # steep band limit
        gain[-1] = 0.0 if band < nyq else gain[-1]
        return signal.firwin2(255, f / nyq, gain)

    def apply(self, wav: np.ndarray, key: str) -> np.ndarray:
        """``wav`` (mono, ``sample_rate``) through the room, the microphone and the noise; ``key`` (the
        file id) seeds this recording's noise samples. Same length as ``wav``."""
        x = np.asarray(wav, dtype=np.float64)
        if x.size == 0:
            return x.astype(np.float32)
        y = signal.fftconvolve(x, self._rir)[: x.size]
        y = signal.fftconvolve(y, self._mic)[len(self._mic) // 2 : len(self._mic) // 2 + x.size]
        power = float(np.mean(y**2))
        digest = int(hashlib.sha256(f"{self.key}|{key}".encode()).hexdigest()[:12], 16)
        rng = np.random.default_rng(digest)
        white = rng.standard_normal(x.size)
        spec = np.fft.rfft(white)
        freqs = np.fft.rfftfreq(x.size, 1 / self.sample_rate)
        spec *= np.maximum(freqs, 20.0) ** (self._noise_slope / 2)
        noise = np.fft.irfft(spec, n=x.size)
        noise *= np.sqrt(power / max(float(np.mean(noise**2)), 1e-20) / 10 ** (self._snr_db / 10))
        return (y + noise).astype(np.float32)
