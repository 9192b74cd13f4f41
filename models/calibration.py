"""Calibration: from cosine scores to the probability that the best-matching enrolled baby is the right one.

A nurse acts on a name by walking to a cot, so the daemon decides from a probability, not from a raw
cosine threshold. The map is fitted per model (``cryid model calibrate``) on infants the model was not
trained on, in simulated ward rooms (some crying babies not enrolled), and stored in the model's
``manifest.json`` as ``calibration``.

- **Confidence** (the probability that the best candidate is right) is a logistic regression on the
  map's ``features`` (of ``KNOWN_FEATURES``): always the best score, the margin to the runner-up and the
  log of the number of enrolled candidates (``LEGACY_FEATURES``; with one candidate the margin is taken
  as 0); a new fit adds whether the best candidate has a nurse-confirmed reference, with its own slope
  on the best score and the margin (confirmed references score the ward's own cries, so the same score
  means more). ``p = sigmoid(w . x + b)``. A map stored with the three legacy features still loads and
  ignores the optional inputs (``confidence(..., best_confirmed=...)``, ``candidates(..., confirmed=...)``).
- **Candidate probabilities**: the best candidate gets ``p``; the others share ``1 - p`` in proportion
  to a softmax of their scores at the fitted ``temperature``.

Pure NumPy, so the daemon needs no scikit-learn or torch.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
from pydantic import Field, field_validator, model_validator

from cryid.models.errors import CryidError
from cryid.models.strict import StrictModel

LEGACY_FEATURES = ("best_score", "margin", "log_candidates")  # maps written before issue 12's follow-up
KNOWN_FEATURES = {
    "best_score": "cosine score of the best candidate",
    "margin": "best score minus the runner-up's (0 with one candidate)",
    "log_candidates": "log of the number of enrolled candidates",
    "best_confirmed": "1 when the best candidate has a confirmed-cry reference",
    "runner_confirmed": "1 when the runner-up has one",
    "confirmed_best_score": "best_score times best_confirmed (its own slope once confirmed)",
    "confirmed_margin": "margin times best_confirmed",
    "log_expirations": "log of the number of expirations pooled into the episode so far",
    "best_minus_mean": "best score minus the mean score of the other candidates (0 with one candidate)",
}
# What a new fit uses: the legacy inputs plus whether the best candidate has a confirmed reference, with
# its own slope on the best score and the margin (bench/calibration_inputs.py: the CV coverage at <= 5%
# wrong rose; the runner-up's flag, the episode length and best-minus-mean did not pay).
FEATURES = (*LEGACY_FEATURES, "best_confirmed", "confirmed_best_score", "confirmed_margin")


class CalibrationError(CryidError):
    """Calibration data or a stored map that cannot be used; the message names the problem and the fix."""


@dataclass(frozen=True)
class Candidate:
    """One enrolled baby with the probability that the cry is theirs."""

    baby_id: str
    score: float
    probability: float


def feature_matrix(
    names: tuple[str, ...],
    best: np.ndarray,
    margin: np.ndarray,
    n_candidates: np.ndarray,
    best_confirmed: np.ndarray | bool = False,
    runner_confirmed: np.ndarray | bool = False,
    expirations: np.ndarray | float = 1.0,
    others_mean: np.ndarray | None = None,
) -> np.ndarray:
    """The inputs ``names`` (of ``KNOWN_FEATURES``) of every query, one row each."""
    best = np.atleast_1d(np.asarray(best, dtype=np.float64))
    n = np.broadcast_to(np.asarray(n_candidates), best.shape)
    several = n > 1
    margin = np.where(several, np.asarray(margin, dtype=np.float64), 0.0)
    conf = np.broadcast_to(np.asarray(best_confirmed, dtype=np.float64), best.shape)
    cols = {
        "best_score": lambda: best,
        "margin": lambda: margin,
        "log_candidates": lambda: np.log(np.maximum(n.astype(np.float64), 1.0)),
        "best_confirmed": lambda: conf,
        "runner_confirmed": lambda: np.where(several, np.asarray(runner_confirmed, np.float64), 0.0),
        "confirmed_best_score": lambda: conf * best,
        "confirmed_margin": lambda: conf * margin,
        "log_expirations": lambda: np.log(np.maximum(np.asarray(expirations, np.float64), 1.0)),
        "best_minus_mean": lambda: np.where(
            several, margin if others_mean is None else best - np.asarray(others_mean, np.float64), 0.0
        ),
    }
    return np.stack([np.broadcast_to(cols[name](), best.shape) for name in names], axis=-1)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40.0, 40.0)))


class Calibration(StrictModel):
    """The fitted map from scores to probabilities, as stored in ``manifest.json`` (``calibration``)."""

    method: str = Field("logistic", pattern="^logistic$", description="How the confidence is computed.")
    features: tuple[str, ...] = Field(
        LEGACY_FEATURES, description="Inputs of the logistic regression, in order (of KNOWN_FEATURES)."
    )
    coef: tuple[float, ...] = Field(description="Logistic regression weights, one per feature.")
    intercept: float = Field(description="Logistic regression intercept.")
    temperature: float = Field(
        0.05, gt=0.0, le=10.0, description="Softmax temperature that shares 1 - confidence among the others."
    )
    confirmed_weight: float = Field(
        0.75,
        ge=0.0,
        le=1.0,
        description="Weight of a baby's confirmed-cry reference against its birth reference in the score.",
    )
    typical_expirations: float = Field(
        4.0,
        ge=1.0,
        le=1000.0,
        description="Expirations assumed when a caller does not say how many were pooled (log_expirations).",
    )
    data: str = Field("", description="What the map was fitted on (data set, split, rooms, seed).")
    fitted_at: str = Field("", description="UTC ISO 8601 time of the fit.")
    n_queries: int = Field(0, ge=0, description="Scored queries the map was fitted on.")
    room_size: int = Field(0, ge=0, description="Babies per simulated room of the operating point (0: none).")
    room_strangers: int = Field(0, ge=0, description="Of them, babies not enrolled (their cries: unknown).")
    rooms: int = Field(0, ge=0, description="Simulated rooms per fit (seeded).")
    seed: int = Field(0, ge=0, description="Seed of the rooms, folds and confirmations.")
    metrics: dict[str, float] = Field(
        default_factory=dict,
        description="Cross-validated figures of the fit (log loss, coverage, wrong rate).",
    )

    @field_validator("features")
    @classmethod
    def _known_features(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [f for f in v if f not in KNOWN_FEATURES]
        if unknown or len(set(v)) != len(v) or tuple(v[:3]) != LEGACY_FEATURES:
            raise ValueError(
                f"features must start with {list(LEGACY_FEATURES)} and hold distinct names of "
                f"{sorted(KNOWN_FEATURES)}, got {list(v)}"
            )
        return tuple(v)

    @model_validator(mode="after")
    def _finite_coef(self) -> Calibration:
        if len(self.coef) != len(self.features) or not np.all(np.isfinite(self.coef)):
            raise ValueError(f"coef must be {len(self.features)} finite numbers, one per feature")
        return self

    @property
    def recommended_min_confidence(self) -> float | None:
        """The operating point ``cryid model calibrate`` chose (``metrics['recommended_min_confidence']``):
        the lowest min_confidence whose cross-validated wrong-baby rate stays at or below the target."""
        value = self.metrics.get("recommended_min_confidence")
        return None if value is None else float(value)

    # use ---------------------------------------------------------------------------------------
    def confidence(
        self,
        best_score: float,
        margin: float | None,
        n_candidates: int,
        best_confirmed: bool = False,
        runner_confirmed: bool = False,
        expirations: int | None = None,
        others_mean: float | None = None,
    ) -> float:
        """Probability that the best of ``n_candidates`` enrolled babies is the one crying.

        ``best_confirmed``/``runner_confirmed``: whether the best candidate / the runner-up has a
        confirmed-cry reference; ``expirations``: how many expirations the episode pooled (None: the map's
        ``typical_expirations``); ``others_mean``: mean score of the other candidates (None: best minus
        margin). A map whose ``features`` do not use an input ignores it."""
        if n_candidates < 1:
            return 0.0
        return float(
            self.confidences(
                np.array([best_score]),
                np.array([margin or 0.0]),
                np.array([n_candidates]),
                best_confirmed=best_confirmed,
                runner_confirmed=runner_confirmed,
                expirations=expirations,
                others_mean=None if others_mean is None else np.array([others_mean]),
            )[0]
        )

    def confidences(
        self,
        best: np.ndarray,
        margin: np.ndarray,
        n_candidates: np.ndarray,
        best_confirmed: np.ndarray | bool = False,
        runner_confirmed: np.ndarray | bool = False,
        expirations: np.ndarray | int | None = None,
        others_mean: np.ndarray | None = None,
    ) -> np.ndarray:
        """Vectorised :meth:`confidence`."""
        x = feature_matrix(
            self.features,
            best,
            margin,
            n_candidates,
            best_confirmed,
            runner_confirmed,
            self.typical_expirations if expirations is None else expirations,
            others_mean,
        )
        return _sigmoid(x @ np.asarray(self.coef) + self.intercept)

    def candidates(
        self,
        ids: list[str],
        scores: np.ndarray,
        top: int = 3,
        confirmed: Collection[str] = frozenset(),
        expirations: int | None = None,
    ) -> list[Candidate]:
        """The ``top`` best-scoring babies with their probabilities (best first). ``confirmed``: the ids
        with a confirmed-cry reference (``ReferenceSet.confirmed_ids``); ``expirations``: how many
        expirations the episode pooled so far."""
        scores = np.asarray(scores, dtype=np.float64).ravel()
        if len(ids) != scores.size:
            raise CalibrationError(f"{len(ids)} ids but {scores.size} scores")
        if scores.size == 0:
            return []
        confirmed = frozenset(confirmed)
        order = np.argsort(-scores, kind="stable")
        best = float(scores[order[0]])
        several = scores.size > 1
        p_best = self.confidence(
            best,
            best - float(scores[order[1]]) if several else 0.0,
            scores.size,
            best_confirmed=ids[order[0]] in confirmed,
            runner_confirmed=several and ids[order[1]] in confirmed,
            expirations=expirations,
            others_mean=float(scores[order[1:]].mean()) if several else None,
        )
        out = [Candidate(ids[order[0]], best, p_best)]
        if several:
            rest = scores[order[1:]]
            w = np.exp((rest - rest.max()) / self.temperature)
            # the rest share 1 - p, but a lower-scoring baby is never more likely than the best one
            share = np.minimum((1.0 - p_best) * w / w.sum(), p_best)
            others = zip(order[1:], share, strict=True)
            out += [Candidate(ids[i], float(scores[i]), float(p)) for i, p in others]
        return out[:top]


# fitting ---------------------------------------------------------------------------------------
def fit_logistic(
    x: np.ndarray, y: np.ndarray, l2: float = 0.1, iterations: int = 100
) -> tuple[np.ndarray, float]:
    """Weights and intercept of a logistic regression (Newton / IRLS) with a weak ridge ``l2`` on the
    weights (not the intercept): a fixed prior, so it fades as data grows and keeps a feature that does
    not vary (one room size) at a finite weight."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.ndim != 2 or x.shape[0] != y.size:
        raise CalibrationError(f"features {x.shape} do not match {y.size} labels")
    if y.size < 10 or y.min() == y.max():
        raise CalibrationError(
            f"calibration needs right and wrong best candidates; got {int(y.sum())} right of {y.size}"
        )
    xb = np.hstack([x, np.ones((x.shape[0], 1))])
    w = np.zeros(xb.shape[1])
    reg = np.full(xb.shape[1], float(l2))
    reg[-1] = 0.0
    for _ in range(iterations):
        p = _sigmoid(xb @ w)
        grad = xb.T @ (p - y) + reg * w
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + np.diag(reg) + 1e-9 * np.eye(xb.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return w[:-1], float(w[-1])


def fit_temperature(score_rows: list[np.ndarray], true_index: list[int]) -> float:
    """Softmax temperature that best predicts the true baby among the candidates (grid search on the
    log-likelihood)."""
    grid = np.geomspace(0.005, 1.0, 60)
    if not score_rows:
        return 0.05
    best_t, best_ll = float(grid[0]), -np.inf
    for t in grid:
        ll = 0.0
        for s, i in zip(score_rows, true_index, strict=True):
            z = (np.asarray(s, dtype=np.float64) - np.max(s)) / t
            ll += z[i] - np.log(np.exp(z).sum())
        if ll > best_ll:
            best_t, best_ll = float(t), ll
    return best_t


def fit_calibration(
    best: np.ndarray,
    margin: np.ndarray,
    n_candidates: np.ndarray,
    correct: np.ndarray,
    score_rows: list[np.ndarray] | None = None,
    true_index: list[int] | None = None,
    features: tuple[str, ...] = FEATURES,
    best_confirmed: np.ndarray | bool = False,
    runner_confirmed: np.ndarray | bool = False,
    expirations: np.ndarray | float = 1.0,
    others_mean: np.ndarray | None = None,
    **info: object,
) -> Calibration:
    """Fit the map on scored queries: ``correct[i]`` is whether query i's best candidate was the right baby
    (false also when the crying baby was not enrolled). ``score_rows``/``true_index`` (queries whose baby
    is enrolled) fit the candidates' temperature. The other inputs are those of ``feature_matrix``;
    ``info`` fills the descriptive fields."""
    inputs = (best_confirmed, runner_confirmed, expirations, others_mean)
    x = feature_matrix(tuple(features), best, margin, n_candidates, *inputs)
    coef, intercept = fit_logistic(x, np.asarray(correct, dtype=np.float64))
    temperature = fit_temperature(score_rows or [], true_index or [])
    return Calibration(
        features=tuple(features),
        coef=tuple(float(c) for c in coef),
        intercept=intercept,
        temperature=temperature,
        n_queries=int(np.asarray(correct).size),
        **info,  # type: ignore[arg-type]
    )


# figures of a fitted map -----------------------------------------------------------------------
def log_loss(p: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Mean negative log-likelihood (nats) of outcomes ``y`` under probabilities ``p``."""
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
    y = np.asarray(y, np.float64)
    w = np.ones_like(p) if weights is None else np.asarray(weights, np.float64)
    return float(-np.sum(w * (y * np.log(p) + (1 - y) * np.log(1 - p))) / np.sum(w))


@dataclass(frozen=True)
class ReliabilityBin:
    """Queries whose predicted probability fell in [low, high): their mean prediction and outcome."""

    low: float
    high: float
    count: int
    predicted: float
    observed: float


def reliability(p: np.ndarray, y: np.ndarray, bins: int = 10) -> list[ReliabilityBin]:
    """Predicted against observed frequency in equal-width probability bins (empty bins left out)."""
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        if m.any():
            out.append(
                ReliabilityBin(
                    float(edges[b]), float(edges[b + 1]), int(m.sum()), float(p[m].mean()), float(y[m].mean())
                )
            )
    return out


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Count-weighted mean |predicted - observed| over the reliability bins."""
    rel = reliability(p, y, bins)
    total = sum(b.count for b in rel)
    return float(sum(b.count * abs(b.predicted - b.observed) for b in rel) / max(total, 1))
