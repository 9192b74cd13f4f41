"""cryid.models.metrics: the NumPy EER/minDCF equal speechbrain's exactly (speechbrain is the reference)."""

from __future__ import annotations

import numpy as np
import pytest

from cryid.models.metrics import MetricError, eer, identification_rates, min_dcf


def _random_sets(n_sets: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Separable, overlapping, heavy ties, float32 and float64, tiny and CryCeleb-sized score sets."""
    rng = np.random.default_rng(20230)
    sets = []
    for k in range(n_sets):
        n_pos = int(rng.integers(1, 60))
        n_neg = int(rng.integers(1, 400))
        shift = rng.uniform(-0.5, 1.5)
        pos = rng.normal(shift, rng.uniform(0.05, 1.0), n_pos)
        neg = rng.normal(0.0, rng.uniform(0.05, 1.0), n_neg)
        if k % 4 == 1:  # many ties, between and within classes
            pos, neg = np.round(pos, 1), np.round(neg, 1)
        if k % 4 == 2:  # cosine-like scores as the notebook has them: float32 cosines stored as float64
            pos, neg = np.tanh(pos).astype(np.float32), np.tanh(neg).astype(np.float32)
        if k % 4 == 3:
            pos, neg = pos.astype(np.float32), neg.astype(np.float32)
        sets.append((pos, neg))
    # CryCeleb dev-sized: 40 positive + 1,540 negative pairs
    sets.append((rng.normal(0.3, 0.2, 40).astype(np.float32), rng.normal(0.1, 0.2, 1540).astype(np.float32)))
    sets.append((np.array([0.5]), np.array([0.5])))  # a single tie
    sets.append((np.array([0.9, 0.8]), np.array([0.1, 0.2, 0.3])))  # perfectly separated
    sets.append((np.array([0.1, 0.2]), np.array([0.8, 0.9, 0.95])))  # perfectly wrong
    return sets


def test_eer_and_min_dcf_equal_speechbrain_on_many_random_score_sets() -> None:
    torch = pytest.importorskip("torch")
    metric_stats = pytest.importorskip("speechbrain.utils.metric_stats")
    sets = _random_sets(300)
    for pos, neg in sets:
        ref_eer, ref_thr = metric_stats.EER(torch.tensor(pos), torch.tensor(neg))
        got_eer, got_thr = eer(pos, neg)
        assert (got_eer, got_thr) == (ref_eer, ref_thr), (pos, neg)
        ref_dcf, ref_dcf_thr = metric_stats.minDCF(torch.tensor(pos), torch.tensor(neg))
        got_dcf, got_dcf_thr = min_dcf(pos, neg)
        assert (got_dcf, got_dcf_thr) == (ref_dcf, ref_dcf_thr), (pos, neg)


def test_eer_known_values() -> None:
    assert eer([0.6, 0.7, 0.8, 0.5], [0.4, 0.3, 0.2, 0.1])[0] == 0.0
    assert eer([0.1, 0.2], [0.8, 0.9])[0] == 1.0
    value, _ = eer(np.linspace(0, 1, 101), np.linspace(0, 1, 101))
    assert 0.45 <= value <= 0.55


@pytest.mark.parametrize(
    ("pos", "neg", "needle"),
    [([], [0.1], "empty"), ([0.1], [np.nan], "NaN"), ([[0.1]], [0.2], "1-D")],
)
def test_bad_scores_are_rejected(pos: list, neg: list, needle: str) -> None:
    with pytest.raises(MetricError, match=needle):
        eer(np.asarray(pos, dtype=float), np.asarray(neg, dtype=float))


def test_identification_rates() -> None:
    scores = np.array(
        [
            [0.9, 0.1, 0.2, 0.0, 0.0, 0.0, 0.0],  # truth 0 ranked first
            [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.0],  # truth 1 ranked sixth
            [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.0],  # truth 3 ranked fourth
        ]
    )
    result = identification_rates(scores, np.array([0, 1, 3]))
    assert result.queries == 3
    assert result.top1 == pytest.approx(1 / 3)
    assert result.top5 == pytest.approx(2 / 3)
    with pytest.raises(MetricError, match="not among"):
        identification_rates(scores, np.array([0, 1, 7]))
