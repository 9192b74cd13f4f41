"""Calibration: from cosine scores to the probability that the best-matching enrolled baby is the right one.

A nurse acts on a name by walking to a cot, so the daemon decides from a probability, not from a raw
cosine threshold. The map is fitted per model (``cryid model calibrate``) on infants the model was not
trained on, in simulated ward rooms (some crying babies not enrolled), and stored in the model's
``manifest.json`` as ``calibration``.

- **Confidence** (the probability that the best candidate is right) is a logistic regression on the
  best score, the margin to the runner-up and the log of the number of enrolled candidates:
  ``p = sigmoid(w . [best, margin, log(n)] + b)``. With one candidate the margin is taken as 0.
- **Candidate probabilities**: the best candidate gets ``p``; the others share ``1 - p`` in proportion
  to a softmax of their scores at the fitted ``temperature``.

Pure NumPy, so the daemon needs no scikit-learn or torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cryid.models.errors import CryidError

FEATURES = ("best_score", "margin", "log_candidates")


class CalibrationError(CryidError):
    """Calibration data or a stored map that cannot be used; the message names the problem and the fix."""


@dataclass(frozen=True)
class Candidate:
    """One enrolled baby with the probability that the cry is theirs."""

    baby_id: str
    score: float
    probability: float


def _features(best: np.ndarray, margin: np.ndarray, n_candidates: np.ndarray) -> np.ndarray:
    best = np.asarray(best, dtype=np.float64)
    margin = np.where(np.asarray(n_candidates) > 1, np.asarray(margin, dtype=np.float64), 0.0)
    logn = np.log(np.maximum(np.asarray(n_candidates, dtype=np.float64), 1.0))
    return np.stack([best, margin, logn], axis=-1)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40.0, 40.0)))


class Calibration(BaseModel):
    """The fitted map from scores to probabilities, as stored in ``manifest.json`` (``calibration``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = Field("logistic", pattern="^logistic$", description="How the confidence is computed.")
    features: tuple[str, ...] = Field(FEATURES, description="Inputs of the logistic regression, in order.")
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
        if tuple(v) != FEATURES:
            raise ValueError(f"features must be {list(FEATURES)}, got {list(v)}")
        return tuple(v)

    @field_validator("coef")
    @classmethod
    def _finite_coef(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if len(v) != len(FEATURES) or not np.all(np.isfinite(v)):
            raise ValueError(f"coef must be {len(FEATURES)} finite numbers")
        return tuple(float(x) for x in v)

    @property
    def recommended_min_confidence(self) -> float | None:
        """The operating point ``cryid model calibrate`` chose (``metrics['recommended_min_confidence']``):
        the lowest min_confidence whose cross-validated wrong-baby rate stays at or below the target."""
        value = self.metrics.get("recommended_min_confidence")
        return None if value is None else float(value)

    # use ---------------------------------------------------------------------------------------
    def confidence(self, best_score: float, margin: float | None, n_candidates: int) -> float:
        """Probability that the best of ``n_candidates`` enrolled babies is the one crying."""
        if n_candidates < 1:
            return 0.0
        x = _features(np.array([best_score]), np.array([margin or 0.0]), np.array([n_candidates]))
        return float(_sigmoid(x @ np.asarray(self.coef) + self.intercept)[0])

    def confidences(self, best: np.ndarray, margin: np.ndarray, n_candidates: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`confidence`."""
        return _sigmoid(_features(best, margin, n_candidates) @ np.asarray(self.coef) + self.intercept)

    def candidates(self, ids: list[str], scores: np.ndarray, top: int = 3) -> list[Candidate]:
        """The ``top`` best-scoring babies with their probabilities (best first)."""
        scores = np.asarray(scores, dtype=np.float64).ravel()
        if len(ids) != scores.size:
            raise CalibrationError(f"{len(ids)} ids but {scores.size} scores")
        if scores.size == 0:
            return []
        order = np.argsort(-scores, kind="stable")
        best = float(scores[order[0]])
        margin = best - float(scores[order[1]]) if scores.size > 1 else 0.0
        p_best = self.confidence(best, margin, scores.size)
        out = [Candidate(ids[order[0]], best, p_best)]
        if scores.size > 1:
            rest = scores[order[1:]]
            w = np.exp((rest - rest.max()) / self.temperature)
            share = (1.0 - p_best) * w / w.sum()
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
    **info: object,
) -> Calibration:
    """Fit the map on scored queries: ``correct[i]`` is whether query i's best candidate was the right baby
    (false also when the crying baby was not enrolled). ``score_rows``/``true_index`` (queries whose baby
    is enrolled) fit the candidates' temperature. ``info`` fills the descriptive fields."""
    x = _features(best, margin, n_candidates)
    coef, intercept = fit_logistic(x, np.asarray(correct, dtype=np.float64))
    temperature = fit_temperature(score_rows or [], true_index or [])
    return Calibration(
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
            out.append(ReliabilityBin(float(edges[b]), float(edges[b + 1]), int(m.sum()),
                                      float(p[m].mean()), float(y[m].mean())))
    return out


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Count-weighted mean |predicted - observed| over the reliability bins."""
    rel = reliability(p, y, bins)
    total = sum(b.count for b in rel)
    return float(sum(b.count * abs(b.predicted - b.observed) for b in rel) / max(total, 1))
