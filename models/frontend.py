"""NumPy front end: speechbrain's ``Fbank(n_mels=80)`` + ``InputNormalization(std_norm=False)``.

Replicates ``speechbrain.processing.features`` exactly: a centred STFT with zero ("constant")
padding of n_fft/2 on each side, a periodic Hamming window, the power spectrum, triangular mel
filters built from ``linspace`` in mel (HTK formula) with ``max(0, min(left, right))`` slopes,
``10*log10(max(x, amin))``, clipping at ``top_db`` below the clip's maximum, then a per-band mean
subtracted: the clip's own over time (``sentence``) or the training data's (``global``).
Vectorised: one ``rfft`` over strided frames and one sparse product with the precomputed mel
matrix. No torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided
from scipy import fft as sp_fft
from scipy import sparse as sp_sparse

from cryid.models.manifest import FrontendParams


def _to_mel(hz: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def _to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_matrix(params: FrontendParams) -> np.ndarray:
    """Triangular filters, shape (n_fft // 2 + 1, n_mels), as speechbrain's ``Filterbank`` builds them."""
    n_stft = params.n_fft // 2 + 1
    mel = np.linspace(_to_mel(params.f_min_hz), _to_mel(params.f_max_hz), params.n_mels + 2)
    hz = _to_hz(mel)
    band = (hz[1:] - hz[:-1])[:-1]
    f_central = hz[1:-1]
    all_freqs = np.linspace(0.0, params.sample_rate // 2, n_stft)
    slope = (all_freqs[None, :] - f_central[:, None]) / band[:, None]
    fbank = np.maximum(0.0, np.minimum(slope + 1.0, 1.0 - slope))
    return np.ascontiguousarray(fbank.T, dtype=np.float32)


def hamming_window(length: int) -> np.ndarray:
    """``torch.hamming_window(length)`` (periodic)."""
    n = np.arange(length, dtype=np.float64)
    return (0.54 - 0.46 * np.cos(2.0 * np.pi * n / length)).astype(np.float32)


class Fbank:
    """Log-mel features of float32 mono clips at ``params.sample_rate``; one clip or many."""

    def __init__(self, params: FrontendParams | None = None, **overrides: Any) -> None:
        """``Fbank()``, ``Fbank(n_mels=80)`` or ``Fbank(manifest.frontend)``."""
        if params is not None and overrides:
            raise ValueError("give FrontendParams or keyword overrides, not both")
        self.params = params if params is not None else FrontendParams(**overrides)
        p = self.params
        if p.win_length > p.n_fft:
            raise ValueError(f"win_length {p.win_length} must not exceed n_fft {p.n_fft}")
        if p.f_min_hz >= p.f_max_hz:
            raise ValueError(f"f_min_hz {p.f_min_hz} must be below f_max_hz {p.f_max_hz}")
        # torch.stft zero-pads a window shorter than n_fft symmetrically to n_fft.
        window = np.zeros(p.n_fft, dtype=np.float32)
        left = (p.n_fft - p.win_length) // 2
        window[left : left + p.win_length] = hamming_window(p.win_length)
        self._window = window
        # Sparse (each FFT bin feeds at most two filters): a dense product would go through
        # multi-threaded BLAS, whose thread wake-ups cost milliseconds on a busy CPU.
        self._mel_t = sp_sparse.csr_matrix(mel_matrix(p).T)
        self._pad = p.n_fft // 2
        self._global_mean = (
            None if p.global_mean is None else np.asarray(p.global_mean, dtype=np.float32)[None, :]
        )

    def n_frames(self, n_samples: int) -> int:
        """Number of feature frames of a clip of ``n_samples`` (centred STFT)."""
        return 1 + n_samples // self.params.hop_length

    def log_mel(self, wav: np.ndarray) -> np.ndarray:
        """``Fbank`` output (before normalisation), shape (frames, n_mels), float32."""
        x = np.asarray(wav, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"expected a 1-D mono clip, got shape {x.shape}")
        p = self.params
        padded = np.zeros(x.shape[0] + 2 * self._pad, dtype=np.float32)
        padded[self._pad : self._pad + x.shape[0]] = x
        n_frames = self.n_frames(x.shape[0])
        stride = padded.strides[0]
        frames = as_strided(padded, shape=(n_frames, p.n_fft), strides=(p.hop_length * stride, stride))
        spec = sp_fft.rfft(frames * self._window, axis=1)
        power = spec.real * spec.real + spec.imag * spec.imag
        mel = np.asarray((self._mel_t @ power.astype(np.float32, copy=False).T).T, dtype=np.float32)
        db = 10.0 * np.log10(np.maximum(mel, np.float32(p.amin)))
        return np.maximum(db, db.max() - np.float32(p.top_db)).astype(np.float32, copy=False)

    def features(self, wav: np.ndarray) -> np.ndarray:
        """Normalised features (the clip's or the global per-band mean removed), (frames, n_mels), float32."""
        db = self.log_mel(wav)
        if self._global_mean is not None:
            return db - self._global_mean
        return db - db.mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32)

    def features_batch(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Features of clips of different lengths; each exactly as ``features`` of that clip alone."""
        return [self.features(w) for w in wavs]


@lru_cache(maxsize=1)
def _default() -> Fbank:
    return Fbank()


def features(wav: np.ndarray) -> np.ndarray:
    """Normalised log-mel features (frames, 80) of one 16 kHz clip with the default parameters."""
    return _default().features(wav)


def features_batch(wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``features`` of clips of different lengths (each computed alone: no padding effects)."""
    return _default().features_batch(wavs)
