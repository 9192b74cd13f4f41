"""Parts of `bench/model_search.py`: data, simulated channels and per-recording statistics.

Everything goes through the daemon's NumPy front end (`cryid.models.frontend.Fbank.log_mel`), so a
statistic set found here can be built into an ONNX graph the same way as the shipped one.

Simulated channels (`Channel`): spectral EQ (random smooth bumps in log frequency plus a tilt),
band limits (3.4 kHz, the AMR-like 4 kHz, 7 kHz or none), a synthetic room (exponentially decaying
noise tail, RT60 0.15-0.8 s, random direct-to-reverberant ratio), coloured noise at 0-30 dB SNR and a
gain of +-20 dB. `ward_channel(seed)` is one fixed such channel that every recording of a split passes
through, as on a ward where one microphone hears every cot.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryid.models.training.gmm_branch import UBM, cepstra, delta

SR = 16000


def load_wavs(data: Path, rows: list[dict[str, str]]) -> dict[str, np.ndarray]:
    import soundfile as sf

    wavs = {}
    for r in rows:
        wav, sr = sf.read(data / r["file_name"], dtype="float32")
        if sr != SR:
            raise ValueError(f"{r['file_name']}: {sr} Hz, expected {SR}")
        wavs[r["file_id"]] = wav
    return wavs


def dev_periods(rows: list[dict[str, str]]) -> dict[tuple[str, str], list[dict[str, str]]]:
    """Dev files grouped by (baby, period) in chronological order (the CryCeleb concatenation)."""
    groups: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for r in sorted((r for r in rows if r["split"] == "dev"), key=lambda r: r["chronological_index"]):
        groups[(r["baby_id"], r["period"])].append(r)
    return dict(sorted(groups.items()))


@dataclass(frozen=True)
class Channel:
    eq_db: np.ndarray  # gain per rfft bin of a 1 s grid (8001 values, 0..8 kHz), dB
    cutoff_hz: float  # 0: no band limit
    rir: np.ndarray  # impulse response (1-D), or empty for none
    snr_db: float  # noise level; inf: none
    noise_eq_db: np.ndarray  # the noise's colour, same grid as eq_db
    gain_db: float
    seed: int


def _smooth_eq(rng: np.random.Generator, max_db: float, tilt_db_per_oct: float) -> np.ndarray:
    f = np.linspace(0, SR / 2, SR // 2 + 1)
    lf = np.log2(np.maximum(f, 50.0) / 1000.0)  # octaves from 1 kHz
    eq = tilt_db_per_oct * lf
    for _ in range(rng.integers(2, 6)):
        centre, width = rng.uniform(-3.5, 3.0), rng.uniform(0.3, 1.5)
        eq += rng.uniform(-max_db, max_db) * np.exp(-0.5 * ((lf - centre) / width) ** 2)
    return eq


def random_channel(seed: int) -> Channel:
    rng = np.random.default_rng(seed)
    cutoff = float(rng.choice([0.0, 0.0, 3400.0, 4000.0, 4000.0, 7000.0]))
    if rng.random() < 0.6:
        rt60, n = rng.uniform(0.15, 0.8), int(SR * 0.9)
        t = np.arange(n) / SR
        tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)
        tail[: int(0.003 * SR)] = 0
        drr = 10 ** (rng.uniform(-3, 12) / 20)  # direct-to-reverberant ratio
        rir = tail / np.sqrt(np.sum(tail**2))
        rir[0] = drr
        rir = rir / np.max(np.abs(rir))
    else:
        rir = np.zeros(0)
    snr = float(rng.uniform(0, 30)) if rng.random() < 0.8 else float("inf")
    return Channel(
        eq_db=_smooth_eq(rng, 8.0, rng.uniform(-3.0, 3.0)),
        cutoff_hz=cutoff,
        rir=rir.astype(np.float32),
        snr_db=snr,
        noise_eq_db=_smooth_eq(rng, 10.0, rng.uniform(-6.0, 0.0)),
        gain_db=float(rng.uniform(-20, 20)),
        seed=seed,
    )


def ward_channel(seed: int = 7) -> Channel:
    """One ward: a room (RT60 0.5 s, cot at a moderate distance), one microphone's EQ, 15 dB of noise."""
    rng = np.random.default_rng(10_000 + seed)
    n = int(SR * 0.9)
    t = np.arange(n) / SR
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / 0.5)
    tail[: int(0.004 * SR)] = 0
    rir = tail / np.sqrt(np.sum(tail**2))
    rir[0] = 10 ** (3 / 20)
    return Channel(
        eq_db=_smooth_eq(rng, 6.0, -1.0),
        cutoff_hz=7000.0,
        rir=(rir / np.max(np.abs(rir))).astype(np.float32),
        snr_db=15.0,
        noise_eq_db=_smooth_eq(rng, 6.0, -3.0),
        gain_db=-6.0,
        seed=seed,
    )


def _interp_eq(eq_db: np.ndarray, n_bins: int) -> np.ndarray:
    grid = np.linspace(0, SR / 2, len(eq_db))
    return 10 ** (np.interp(np.linspace(0, SR / 2, n_bins), grid, eq_db) / 20)


def apply_channel(wav: np.ndarray, ch: Channel, noise_seed: int) -> np.ndarray:
    x = np.asarray(wav, dtype=np.float64)
    n = len(x)
    if len(ch.rir):
        m = n + len(ch.rir) - 1
        nfft = 1 << (m - 1).bit_length()
        x = np.fft.irfft(np.fft.rfft(x, nfft) * np.fft.rfft(ch.rir, nfft), nfft)[:n]
    spec = np.fft.rfft(x)
    spec *= _interp_eq(ch.eq_db, len(spec))
    freqs = np.fft.rfftfreq(n, 1.0 / SR)
    if ch.cutoff_hz > 0:
        spec[freqs > ch.cutoff_hz] = 0
    x = np.fft.irfft(spec, n)
    if np.isfinite(ch.snr_db):
        rng = np.random.default_rng(noise_seed)
        nspec = np.fft.rfft(rng.standard_normal(n)) * _interp_eq(ch.noise_eq_db, len(spec))
        if ch.cutoff_hz > 0:
            nspec[freqs > ch.cutoff_hz] = 0
        noise = np.fft.irfft(nspec, n)
        p_sig = np.mean(x**2) + 1e-12
        noise *= np.sqrt(p_sig / (np.mean(noise**2) + 1e-12) / 10 ** (ch.snr_db / 10))
        x = x + noise
    x = x * 10 ** (ch.gain_db / 20)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


# --- statistics of one recording's raw log-mel L (frames, 80) ------------------------------------


def _ms(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x.mean(0), np.sqrt(np.maximum(x.var(0), 1e-5))])


def shipped_stats(x: np.ndarray) -> np.ndarray:
    """The shipped network's 1120 statistics of globally normalised log-mel x (`stats_init` with
    level -100; frame-gain -100/-10/0/10; delta -5/5), in NumPy: a -100 dB threshold is x + 100."""
    shape = x - x.mean(axis=1, keepdims=True)
    d = delta(x)
    chans = [x + 100.0, shape + 100.0] + [np.maximum(shape - t, 0) for t in (-10.0, 0.0, 10.0)]
    chans += [np.maximum(d - t, 0) for t in (-5.0, 5.0)]
    c = np.concatenate(chans, axis=1)
    return _ms(c)


def loud_frames(lm: np.ndarray, below_db: float = 20.0) -> np.ndarray:
    """Frames whose mean log-mel is within `below_db` of the clip's 95th percentile: the cry, not the
    pauses and the room between cries."""
    e = lm.mean(axis=1)
    keep = e >= np.percentile(e, 95) - below_db
    return lm[keep] if keep.sum() >= 10 else lm


# --- GMM supervectors (cryid.models.training.gmm_branch: the product's own code) ----------------------

N_CEPS, RELEVANCE, COMPONENTS = 20, 16.0, 64


@dataclass(frozen=True)
class StatContext:
    """What the statistic sets need beyond one recording: the training split's per-band means (80 and
    150 mels), the 150-mel front end and the UBM (all fitted on train only)."""

    gmean: np.ndarray
    fb150: object
    gmean150: np.ndarray
    ubm: UBM


def feature_sets(
    lm: np.ndarray, gmean: np.ndarray, wav: np.ndarray | None = None, ctx: StatContext | None = None
) -> dict[str, np.ndarray]:
    """All statistic sets of one recording (raw log-mel `lm`, training split's per-band mean `gmean`);
    with the recording itself and a `StatContext`, also the 150-mel and GMM-supervector sets."""
    x = lm - gmean
    loud = loud_frames(lm) - gmean
    sent_loud = loud - loud.mean(axis=0, keepdims=True)  # sentence norm: long-term spectrum removed
    sent_shape = sent_loud - sent_loud.mean(axis=1, keepdims=True)
    inv = np.concatenate(
        [
            np.sqrt(np.maximum(loud.var(0), 1e-5)),  # per-band spread (a fixed EQ does not change it)
            np.percentile(sent_loud, 90, axis=0) - np.percentile(sent_loud, 10, axis=0),
            _ms(np.maximum(sent_shape, 0))[:80],
            _ms(np.abs(delta(loud)))[:80],
            np.sqrt(np.maximum(delta(loud).var(0), 1e-5)),
        ]
    )
    ship = shipped_stats(x)
    ship_loud = shipped_stats(loud)
    out = {
        "fbank_ms": _ms(lm),
        "fbank_ms_loud": _ms(loud),
        "shipped_stats": ship,
        "shipped_stats_loud": ship_loud,
        "chan_invariant": inv,
        "shipped_loud+inv": np.concatenate([ship_loud, inv]),
        "shipped+loud_ms": np.concatenate([ship, _ms(loud)]),
    }
    if ctx is not None and wav is not None:
        lm150 = ctx.fb150.log_mel(wav)
        out["fbank150_ms"] = _ms(lm150)
        out["shipped_stats150"] = shipped_stats(lm150 - ctx.gmean150)
        out["gmm_sv"] = ctx.ubm.supervector(cepstra(x, N_CEPS), RELEVANCE).astype(np.float32)
    return out
