"""The daemon's naming rule for a calibrated model, as one pure function shared by the identifier (one
decision at a time) and ``cryid eval`` (every simulated query at once), so the eval's coverage and
wrong-baby rate are what the daemon would do.

The best-matching baby is named when the calibrated confidence that it is the one crying reaches
``min_confidence`` if a nurse has confirmed one of its cries, else ``min_confidence_unconfirmed`` (a
threshold of 1.0 means never: no calibrated probability is certain), and any expert ``min_score`` (best
cosine) and ``min_margin`` (best minus runner-up) are met too. The thresholds are the daemon's
``identifier.*`` settings, whose defaults ``daemon/config.py`` writes once; this layer takes any object
that has them (``NamingThresholds``) and never imports the daemon.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike


class NamingThresholds(Protocol):
    """What the rule reads: ``identifier.*`` of the daemon's settings (``IdentifierSettings``) or a
    :class:`NamingRule`."""

    @property
    def min_confidence(self) -> float: ...

    @property
    def min_confidence_unconfirmed(self) -> float: ...

    @property
    def min_score(self) -> float | None: ...

    @property
    def min_margin(self) -> float | None: ...


@dataclass(frozen=True)
class NamingRule:
    """The thresholds of one decision rule, as plain values (no defaults here: they are the settings')."""

    min_confidence: float
    min_confidence_unconfirmed: float
    min_score: float | None = None
    min_margin: float | None = None

    @classmethod
    def of(cls, thresholds: NamingThresholds) -> NamingRule:
        """The values of ``thresholds`` (e.g. ``settings.identifier``)."""
        return cls(
            float(thresholds.min_confidence),
            float(thresholds.min_confidence_unconfirmed),
            thresholds.min_score,
            thresholds.min_margin,
        )


def names_best(
    rule: NamingThresholds,
    confidence: ArrayLike,
    best_confirmed: ArrayLike,
    best_score: ArrayLike,
    margin: ArrayLike,
) -> np.ndarray:
    """Whether the best-matching baby is named, elementwise (a 0-d array for scalars).

    ``confidence``: the calibrated probability that the best candidate is the one crying;
    ``best_confirmed``: that candidate has a nurse-confirmed cry; ``best_score``: its cosine;
    ``margin``: best minus runner-up (the daemon takes the best score itself with one candidate)."""
    conf = np.asarray(confidence, dtype=np.float64)
    need = np.where(
        np.asarray(best_confirmed, dtype=bool), rule.min_confidence, rule.min_confidence_unconfirmed
    )
    ok = (need < 1.0) & (conf >= need)  # 1.0: never (no calibrated probability is certain)
    if rule.min_score is not None:
        ok = ok & (np.asarray(best_score, dtype=np.float64) >= rule.min_score)
    if rule.min_margin is not None:
        ok = ok & (np.asarray(margin, dtype=np.float64) >= rule.min_margin)
    return np.asarray(ok, dtype=bool)


def why_not_named(
    rule: NamingThresholds, confidence: float, best_confirmed: bool, best_score: float, margin: float
) -> str | None:
    """One decision's reason for naming nobody (``None``: :func:`names_best` names the best baby), the
    event's ``reason``: ``not_confirmed`` when the best baby would pass ``min_confidence`` and only a
    nurse-confirmed cry of it is missing, else the first threshold missed (confidence, then the expert
    ``min_score`` and ``min_margin``)."""
    if names_best(rule, confidence, best_confirmed, best_score, margin):
        return None
    need = rule.min_confidence if best_confirmed else rule.min_confidence_unconfirmed
    sure = need < 1.0 and confidence >= need
    unconfirmed_only = not best_confirmed and rule.min_confidence < 1.0 and confidence >= rule.min_confidence
    if not sure and not unconfirmed_only:
        return "below_min_confidence"
    if rule.min_score is not None and best_score < rule.min_score:
        return "below_min_score"
    if rule.min_margin is not None and margin < rule.min_margin:
        return "below_min_margin"
    return "not_confirmed"
