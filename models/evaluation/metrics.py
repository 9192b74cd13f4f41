"""Verification and identification metrics in NumPy (no torch).

``eer`` and ``min_dcf`` reproduce ``speechbrain.utils.metric_stats.EER`` and ``minDCF`` bit for bit
(same candidate thresholds, same float32 rates, same tie-breaking), so figures computed with the ONNX
backend are the paper's figures. ``tests/test_metrics.py`` proves the equality on many random score sets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cryid.models.errors import CryidError


class MetricError(CryidError):
    """Scores that no metric can be computed from (empty, NaN, wrong shape)."""


def _as_scores(scores: np.ndarray | list[float], name: str) -> np.ndarray:
    arr = np.asarray(scores)
    if arr.ndim != 1:
        raise MetricError(f"{name} must be a 1-D array of scores, got shape {arr.shape}")
    if arr.size == 0:
        raise MetricError(f"{name} is empty: EER needs at least one positive and one negative pair")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)  # torch.tensor(ints) would not even run speechbrain's EER
    if not np.all(np.isfinite(arr)):
        raise MetricError(f"{name} holds NaN or infinite scores")
    return arr


def _candidate_thresholds(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Sorted unique scores plus the midpoints between neighbours, in the scores' own precision."""
    dtype = np.result_type(pos.dtype, neg.dtype)
    unique = np.unique(np.concatenate([pos, neg]).astype(dtype))
    mids = ((unique[:-1] + unique[1:]) / dtype.type(2)).astype(dtype)
    return np.sort(np.concatenate([unique, mids]))


def _rates(pos: np.ndarray, neg: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 FRR (pos <= t) and FAR (neg > t) at every threshold, as torch computes them."""
    n_miss = np.searchsorted(np.sort(pos), thresholds, side="right")
    n_fa = neg.size - np.searchsorted(np.sort(neg), thresholds, side="right")
    frr = n_miss.astype(np.float32) / np.float32(pos.size)
    far = n_fa.astype(np.float32) / np.float32(neg.size)
    return frr, far


def eer(
    positive_scores: np.ndarray | list[float], negative_scores: np.ndarray | list[float]
) -> tuple[float, float]:
    """Equal error rate (fraction 0-1) and its threshold, exactly as speechbrain's ``EER``.

    speechbrain keeps the first threshold whose float32 ``|FAR - FRR|`` is strictly below the
    double-precision gap of the threshold kept so far; the loop below repeats that comparison.
    """
    pos = _as_scores(positive_scores, "positive scores")
    neg = _as_scores(negative_scores, "negative scores")
    thresholds = _candidate_thresholds(pos, neg)
    frr, far = _rates(pos, neg, thresholds)
    gap32 = np.abs(far - frr).astype(np.float64).tolist()  # float32 difference, as torch's .abs().item()
    far64 = far.astype(np.float64).tolist()
    frr64 = frr.astype(np.float64).tolist()
    best = 0
    best_gap = abs(far64[0] - frr64[0])
    for i in range(1, len(gap32)):
        if gap32[i] < best_gap:
            best = i
            best_gap = abs(far64[i] - frr64[i])
    return float((far64[best] + frr64[best]) / 2), float(thresholds[best])


def min_dcf(
    positive_scores: np.ndarray | list[float],
    negative_scores: np.ndarray | list[float],
    c_miss: float = 1.0,
    c_fa: float = 1.0,
    p_target: float = 0.01,
) -> tuple[float, float]:
    """Minimum detection cost and its threshold, exactly as speechbrain's ``minDCF``."""
    pos = _as_scores(positive_scores, "positive scores")
    neg = _as_scores(negative_scores, "negative scores")
    thresholds = _candidate_thresholds(pos, neg)
    p_miss, p_fa = _rates(pos, neg, thresholds)
    f32 = np.float32
    c_det = (f32(c_miss) * p_miss * f32(p_target)) + (f32(c_fa) * p_fa * f32(1 - p_target))
    idx = int(np.argmin(c_det))
    return float(c_det[idx]), float(thresholds[idx])


@dataclass(frozen=True)
class IdentificationRates:
    """Closed-set identification rates (fractions 0-1) over ``queries`` queries."""

    top1: float
    top5: float
    queries: int


def identification_rates(scores: np.ndarray, true_index: np.ndarray) -> IdentificationRates:
    """Top-1 / top-5 rates of a (queries, candidates) score matrix; ``true_index``: each query's column."""
    s = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(true_index, dtype=np.int64)
    if s.ndim != 2 or truth.shape != (s.shape[0],):
        raise MetricError(f"score matrix {s.shape} and truth {truth.shape} do not match")
    if s.shape[0] == 0:
        raise MetricError("no queries to identify")
    if np.any((truth < 0) | (truth >= s.shape[1])):
        raise MetricError("a query's true identity is not among the candidates")
    true_scores = s[np.arange(s.shape[0]), truth]
    # rank = how many candidates score strictly higher than the truth (ties count in the truth's favour)
    rank = (s > true_scores[:, None]).sum(axis=1)
    return IdentificationRates(
        top1=float(np.mean(rank < 1)), top5=float(np.mean(rank < 5)), queries=int(s.shape[0])
    )


# bootstrap over infants ---------------------------------------------------------------------------
def weighted_eer(
    positive_scores: np.ndarray,
    negative_scores: np.ndarray,
    positive_weights: np.ndarray,
    negative_weights: np.ndarray,
) -> float | None:
    """EER of weighted scores (a resample's multiplicities), vectorised for the bootstrap.

    Same candidate thresholds as :func:`eer` (unique scores and midpoints); the threshold where
    ``|FAR - FRR|`` is smallest. With unit weights it agrees with :func:`eer` up to speechbrain's
    float32 tie-breaking. None when either side has no weight.
    """
    pos, neg = np.asarray(positive_scores, np.float64), np.asarray(negative_scores, np.float64)
    wp, wn = np.asarray(positive_weights, np.float64), np.asarray(negative_weights, np.float64)
    keep_p, keep_n = wp > 0, wn > 0
    pos, wp, neg, wn = pos[keep_p], wp[keep_p], neg[keep_n], wn[keep_n]
    if pos.size == 0 or neg.size == 0:
        return None
    thresholds = _candidate_thresholds(pos, neg)
    op, on = np.argsort(pos, kind="stable"), np.argsort(neg, kind="stable")
    cp = np.concatenate([[0.0], np.cumsum(wp[op])])
    cn = np.concatenate([[0.0], np.cumsum(wn[on])])
    frr = cp[np.searchsorted(pos[op], thresholds, side="right")] / cp[-1]
    far = 1.0 - cn[np.searchsorted(neg[on], thresholds, side="right")] / cn[-1]
    i = int(np.argmin(np.abs(far - frr)))
    return float((far[i] + frr[i]) / 2)


def bootstrap_ci(
    n_infants: int,
    statistic: Callable[[np.ndarray], float | None],
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile interval of ``statistic(counts)`` over ``resamples`` resamples of the infants.

    ``counts[i]`` is how often infant ``i`` (0..n_infants-1) was drawn, with replacement; the statistic
    weighs each infant's data by it. Resamples where the statistic is undefined (None or NaN) are
    dropped; None when fewer than half are defined or there are fewer than two infants.
    """
    if n_infants < 2 or resamples < 1:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        counts = np.bincount(rng.integers(0, n_infants, n_infants), minlength=n_infants)
        v = statistic(counts.astype(np.float64))
        if v is not None and np.isfinite(v):
            values.append(v)
    if len(values) < resamples / 2:
        return None
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def infant_codes(infants: list[str] | np.ndarray) -> tuple[np.ndarray, int]:
    """Integer code of each row's infant (for :func:`bootstrap_ci` weights) and the number of infants."""
    uniq, codes = np.unique(np.asarray(infants, dtype=str), return_inverse=True)
    return codes.astype(np.int64), int(uniq.size)
