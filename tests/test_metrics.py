"""cryid.models.evaluation.metrics: the NumPy EER/minDCF equal speechbrain's exactly (speechbrain is the
reference)."""

from __future__ import annotations

import numpy as np
import pytest

from cryid.models.evaluation.metrics import MetricError, eer, identification_rates, min_dcf


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


def test_weighted_eer_matches_eer_with_unit_weights_and_repetition() -> None:
    from cryid.models.evaluation.metrics import weighted_eer

    rng = np.random.default_rng(8)
    for _ in range(20):
        pos, neg = rng.normal(1, 1, 40), rng.normal(0, 1, 300)
        assert abs(weighted_eer(pos, neg, np.ones(40), np.ones(300)) - eer(pos, neg)[0]) <= 1 / 40
        wp, wn = rng.integers(0, 3, 40), rng.integers(0, 3, 300)
        got = weighted_eer(pos, neg, wp, wn)
        assert got == pytest.approx(weighted_eer(np.repeat(pos, wp), np.repeat(neg, wn), np.ones(wp.sum()),
                                                 np.ones(wn.sum())))  # fmt: skip
    assert weighted_eer(np.array([1.0]), np.array([0.0]), np.zeros(1), np.ones(1)) is None


def test_bootstrap_interval_holds_the_estimate_and_shrinks_with_more_infants() -> None:
    from cryid.models.evaluation.metrics import bootstrap_ci

    widths = []
    for n in (20, 500):
        rng = np.random.default_rng(n)
        per_infant = rng.uniform(size=n) < 0.3  # each infant right or wrong

        def rate(counts: np.ndarray, x: np.ndarray = per_infant) -> float:
            return float(np.sum(counts * x) / np.sum(counts))

        lo, hi = bootstrap_ci(n, rate, 1000, seed=1)
        assert lo <= per_infant.mean() <= hi
        assert bootstrap_ci(n, rate, 1000, seed=1) == (lo, hi)  # seeded
        widths.append(hi - lo)
    assert widths[1] < 0.35 * widths[0]
    assert bootstrap_ci(1, lambda c: 0.0) is None
