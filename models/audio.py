"""Audio I/O at the edges: read any common file format, down-mix, resample to 16 kHz float32."""

from __future__ import annotations

import logging
from math import gcd
from pathlib import Path

import numpy as np

from cryid.models.errors import CryidError

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000


class AudioError(CryidError):
    """An audio file or buffer that cryid cannot use; the message names the problem and the fix."""


def to_mono_float32(data: np.ndarray) -> np.ndarray:
    """Down-mix (frames, channels) or (frames,) audio to mono float32."""
    arr = np.asarray(data)
    if arr.dtype == np.int16:
        arr = arr.astype(np.float32) / 32768.0
    arr = arr.astype(np.float32, copy=False)
    if arr.ndim == 2:
        arr = arr.mean(axis=1)
    elif arr.ndim != 1:
        raise AudioError(f"expected 1-D or 2-D audio, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def resample(wav: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling (scipy.signal.resample_poly) of mono float32 audio."""
    if orig_sr == target_sr:
        return wav
    if orig_sr <= 0:
        raise AudioError(f"invalid sample rate {orig_sr}")
    from scipy.signal import resample_poly

    g = gcd(int(orig_sr), int(target_sr))
    return resample_poly(wav, target_sr // g, orig_sr // g).astype(np.float32)


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read WAV/FLAC/OGG/... with libsndfile, down-mix to mono and resample to ``sample_rate``."""
    import soundfile as sf

    p = Path(path)
    if not p.exists():
        raise AudioError(f"{p}: no such file")
    if p.is_dir():
        raise AudioError(f"{p}: is a directory, expected an audio file")
    try:
        data, sr = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile raises its own error types for every bad format
        raise AudioError(
            f"{p}: not a readable audio file ({str(exc).splitlines()[0]}); use WAV or FLAC"
        ) from exc
    if data.shape[0] == 0:
        raise AudioError(f"{p}: the file holds no audio samples")
    return resample(to_mono_float32(data), int(sr), sample_rate)


def record(seconds: float, device: int | str | None = None, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Record ``seconds`` of mono audio from an input device (sounddevice, blocking) as float32."""
    if not 0 < seconds <= 600:
        raise AudioError(f"cannot record {seconds} s; give --seconds between 0 and 600")
    try:
        import sounddevice as sd

        data = sd.rec(
            round(seconds * sample_rate), samplerate=sample_rate, channels=1, dtype="float32", device=device
        )
        sd.wait()
    except Exception as exc:  # PortAudio raises its own error types (no device, busy device, ...)
        raise AudioError(
            f"cannot record from input device {device!r} ({(str(exc).splitlines() or [repr(exc)])[0]}); "
            "see `cryid devices` and set the device"
        ) from exc
    return to_mono_float32(data)


def replace_nonfinite(x: np.ndarray) -> tuple[np.ndarray, int]:
    """``x`` with NaN and infinite samples replaced by 0, and how many there were (no copy when none)."""
    bad = ~np.isfinite(x)
    n = int(np.count_nonzero(bad))
    if n == 0:
        return x, 0
    return np.where(bad, np.zeros((), dtype=x.dtype), x), n


class HighPass:
    """Streaming Butterworth high-pass (removes DC offset and rumble), its state kept between chunks.

    Second-order sections run sample by sample with the carried state, so the output does not depend on
    how the stream is cut into chunks. ``cutoff_hz`` 0 passes the audio through unchanged.
    """

    def __init__(self, cutoff_hz: float, sample_rate: int = SAMPLE_RATE, order: int = 2) -> None:
        if not 0 <= cutoff_hz < sample_rate / 2:
            raise AudioError(f"high-pass cut-off {cutoff_hz} Hz outside 0..{sample_rate / 2:g} Hz")
        self._sos: np.ndarray | None = None
        if cutoff_hz > 0:
            from scipy.signal import butter

            self._sos = np.asarray(butter(order, cutoff_hz, btype="highpass", fs=sample_rate, output="sos"))
        self.reset()

    def reset(self) -> None:
        self._zi = None if self._sos is None else np.zeros((self._sos.shape[0], 2))

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Filter float32 mono audio (finite samples); returns float32 of the same length."""
        x = np.asarray(chunk, dtype=np.float32)
        if self._sos is None or x.size == 0:
            return x
        from scipy.signal import sosfilt

        y, self._zi = sosfilt(self._sos, x.astype(np.float64), zi=self._zi)
        return y.astype(np.float32)


class StreamResampler:
    """Chunk-by-chunk polyphase resampling, equal (to float rounding) to ``resample`` of the whole signal.

    Input is processed in blocks whose length is a multiple of the decimation factor, each with enough
    history and look-ahead for the anti-aliasing filter, so chunk boundaries leave no trace. The price
    is a latency of a few milliseconds (the look-ahead). ``flush()`` returns the tail at end of stream.
    """

    def __init__(self, orig_sr: int, target_sr: int = SAMPLE_RATE) -> None:
        if orig_sr <= 0 or target_sr <= 0:
            raise AudioError(f"invalid sample rate {orig_sr} -> {target_sr}")
        g = gcd(int(orig_sr), int(target_sr))
        self.orig_sr, self.target_sr = int(orig_sr), int(target_sr)
        self._up, self._down = self.target_sr // g, self.orig_sr // g
        # resample_poly's filter reaches 10 * max(up, down) upsampled samples each side
        reach = 10 * max(self._up, self._down) / self._up + 2
        self._pad = self._down * int(np.ceil(reach / self._down))
        self._fir: np.ndarray | None = None
        if self._up != self._down:  # resample_poly's own filter, designed once instead of per call
            from scipy.signal import firwin

            rate = max(self._up, self._down)
            self._fir = firwin(20 * rate + 1, 1.0 / rate, window=("kaiser", 5.0)).astype(np.float32)
        self.reset()

    def reset(self) -> None:
        self._buf = np.zeros(self._pad, dtype=np.float32)  # history (zeros: the signal's left edge)
        self._n_in = 0
        self._n_out = 0

    def _run(self, ready: int) -> np.ndarray:
        from scipy.signal import resample_poly

        seg = self._buf[: self._pad + ready + self._pad]
        y = resample_poly(seg, self._up, self._down, window=self._fir)
        first = self._pad * self._up // self._down
        out = y[first : first + ready * self._up // self._down].astype(np.float32)
        self._buf = self._buf[ready:]
        return out

    def process(self, chunk: np.ndarray) -> np.ndarray:
        x = np.asarray(chunk, dtype=np.float32)
        if self._up == self._down:
            self._n_in += x.size
            self._n_out += x.size
            return x
        self._buf = np.concatenate([self._buf, x])
        self._n_in += x.size
        ready = (self._buf.size - 2 * self._pad) // self._down * self._down
        if ready <= 0:
            return np.zeros(0, dtype=np.float32)
        out = self._run(ready)
        self._n_out += out.size
        return out

    def flush(self) -> np.ndarray:
        """The remaining output at end of stream (the right edge padded with zeros, as ``resample``)."""
        if self._up == self._down:
            return np.zeros(0, dtype=np.float32)
        total = -(-self._n_in * self._up // self._down)
        pending = self._buf.size - self._pad
        ready = -(-pending // self._down) * self._down
        self._buf = np.concatenate([self._buf, np.zeros(ready - pending + self._pad, dtype=np.float32)])
        out = self._run(ready)[: max(0, total - self._n_out)] if ready > 0 else np.zeros(0, np.float32)
        self._n_out += out.size
        return out
