"""Identifier: embeddings of cry expirations -> which of the room's babies, per expiration and per episode.

A plain synchronous stage. Each expiration's L2-normalised embedding joins the current crying episode
(expirations at most ``episode_gap_s`` apart); a decision scores the re-normalised mean of the
episode's embeddings so far against the room's references (:class:`~cryid.models.scoring.ReferenceSet`):
best, runner-up, margin, and, with a calibrated model, the probability that the best baby is the one
crying given how many babies the room has (:class:`~cryid.models.calibration.Calibration`). A baby is
named (``identified``) when that probability is at least ``min_confidence`` (``min_confidence_unconfirmed``,
by default never, while no cry of the best baby has been confirmed by a nurse) and any expert
``min_score``/``min_margin`` override is met too: ``cryid.models.decision.names_best`` (and
``why_not_named``), the one rule ``cryid eval`` applies as well. A model without a calibration decides on
cosine thresholds (``min_score``/``min_margin``, else ``fallback_min_score``/``fallback_min_margin``) and
reports no confidence. Unnamed decisions still carry the three likeliest candidates, each with whether a
nurse has confirmed one of its cries, and the ``reason`` no baby was named
(:data:`~cryid.daemon.events.REASONS`).

``process`` returns a provisional ``expiration`` result at once; the final ``episode`` result (with the
episode's embeddings, so they can be kept for nurse confirmation) comes when the episode is over
(``advance`` / ``flush``) or a new one starts. Time is the sample index of the stream.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Literal, cast

import numpy as np

from cryid.daemon.config import IdentifierSettings
from cryid.daemon.events import CandidateOut, CryEvent, Reason, RunnerUp
from cryid.models.decision import why_not_named
from cryid.models.scoring import ReferenceSet, l2_normalize

if TYPE_CHECKING:
    from cryid.models.calibration import Calibration
    from cryid.models.pipeline import EmbeddedExpiration

logger = logging.getLogger(__name__)

TOP_CANDIDATES = 3
DEFAULT_CONFIRMED_WEIGHT = 0.75  # ReferenceSet's own default, for models without a calibration


@dataclass(frozen=True)
class MatchCandidate:
    """One of the likeliest babies: its score, with a calibrated model its probability, and whether it had a
    confirmed-cry reference when the decision was made."""

    baby_id: str
    score: float
    probability: float | None
    confirmed: bool = False


@dataclass(frozen=True)
class Match:
    """The decision for one (aggregate) embedding against the room's references."""

    decision: Literal["identified", "unknown"]
    best_baby_id: str | None
    score: float | None
    runner_up_id: str | None
    runner_up_score: float | None
    margin: float | None
    confidence: float | None = None
    candidates: tuple[MatchCandidate, ...] = ()
    n_candidates: int = 0
    reason: Reason | None = None  # why ``unknown``; None when ``identified``

    @property
    def baby_id(self) -> str | None:
        return self.best_baby_id if self.decision == "identified" else None


def _r(x: float | None, digits: int = 5) -> float | None:
    return None if x is None else round(float(x), digits)


@dataclass(frozen=True)
class Identification:
    """One result of the identifier, in stream samples; :meth:`to_event` turns it into a payload.

    ``embeddings``: for ``episode`` results, the episode's L2-normalised expiration embeddings
    (float32, one row per expiration, in order), so the service can keep them; None for provisional ones.
    """

    kind: Literal["expiration", "episode"]
    event_id: str
    episode_id: str
    match: Match
    start_sample: int
    end_sample: int
    n_expirations: int
    level_dbfs: float
    embeddings: np.ndarray | None = field(default=None, compare=False, repr=False)

    def to_event(self, stream_start: datetime, sample_rate: int, model_sha256: str, room: str) -> CryEvent:
        """The MQTT payload: sample indices become UTC times from ``stream_start`` and stream offsets."""
        start_s = self.start_sample / sample_rate
        end_s = self.end_sample / sample_rate
        m = self.match
        runner_up = (
            RunnerUp(baby_id=m.runner_up_id, score=round(m.runner_up_score, 5))
            if m.runner_up_id is not None and m.runner_up_score is not None
            else None
        )
        return CryEvent(
            event_id=self.event_id,
            episode_id=self.episode_id,
            kind=self.kind,
            decision=m.decision,
            baby_id=m.baby_id,
            best_baby_id=m.best_baby_id,
            score=_r(m.score),
            runner_up=runner_up,
            margin=_r(m.margin),
            confidence=_r(m.confidence),
            candidates=[
                CandidateOut(
                    baby_id=c.baby_id,
                    score=round(c.score, 5),
                    probability=_r(c.probability),
                    confirmed=c.confirmed,
                )
                for c in m.candidates
            ],
            n_candidates=m.n_candidates,
            reason=m.reason,
            started_at=stream_start + timedelta(seconds=start_s),
            ended_at=stream_start + timedelta(seconds=end_s),
            stream_offset_s=round(start_s, 4),
            duration_s=round(end_s - start_s, 4),
            n_expirations=self.n_expirations,
            level_dbfs=round(self.level_dbfs, 2),
            model_sha256=model_sha256,
            room=room,
        )


class Identifier:
    """Expirations with embeddings in, provisional and final identifications out."""

    def __init__(
        self,
        settings: IdentifierSettings,
        references: ReferenceSet | dict[str, np.ndarray],
        sample_rate: int = 16000,
        settle_samples: int = 0,
        calibration: Calibration | None = None,
    ) -> None:
        """``references``: the room's babies (a dict of birth centroids is taken as a ReferenceSet).
        ``settle_samples``: how long after its start an expiration can still be reported (the
        segmenter's longest expiration plus hang-over); an episode closes only once no expiration that
        could still arrive can belong to it. ``calibration``: the model's, or None (cosine thresholds)."""
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if settle_samples < 0:
            raise ValueError(f"settle_samples must be >= 0, got {settle_samples}")
        self.sample_rate = sample_rate
        self.settle_samples = settle_samples
        self.settings = settings
        self.calibration = calibration
        self._refs = ReferenceSet({})
        if isinstance(references, ReferenceSet):
            self.set_references(references)
        else:
            self.set_centroids(references)
        self.reset()

    # configuration -------------------------------------------------------------------------
    @property
    def confirmed_weight(self) -> float:
        """Weight of confirmed-cry references: the calibration's, else ReferenceSet's default."""
        return self.calibration.confirmed_weight if self.calibration is not None else DEFAULT_CONFIRMED_WEIGHT

    def set_references(self, references: ReferenceSet) -> None:
        """Replace the room's references (after an enrollment, a move, a confirmation, a reload)."""
        self._refs = references

    def set_centroids(self, centroids: dict[str, np.ndarray]) -> None:
        """Replace the references by birth centroids only."""
        self.set_references(ReferenceSet(centroids, None, self.confirmed_weight))

    def set_settings(self, settings: IdentifierSettings) -> None:
        """New thresholds and gaps (SIGHUP); the current episode continues under them."""
        self.settings = settings

    @property
    def enrolled(self) -> list[str]:
        return list(self._refs.ids)

    # stage -----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the current episode."""
        self._episode_id: str | None = None
        self._embeddings: list[np.ndarray] = []
        self._start = 0
        self._end = 0
        self._level = -120.0

    def match(self, embedding: np.ndarray) -> Match:
        """The decision for one (possibly pooled) embedding against the room's references."""
        s = self.settings
        refs = self._refs
        n = len(refs)
        if n == 0:
            return Match("unknown", None, None, None, None, None, reason="no_candidates")
        scores = refs.scores(embedding)  # a wrong embedding size is a ValueError naming the fix
        order = np.argsort(-scores.astype(np.float64), kind="stable")
        best_id, best = refs.ids[int(order[0])], float(scores[order[0]])
        if n > 1:
            ru_id, ru_score = refs.ids[int(order[1])], float(scores[order[1]])
            margin = best - ru_score
        else:
            ru_id, ru_score, margin = None, None, best
        has = dict(zip(refs.ids, (bool(h) for h in refs.has_confirmed), strict=True))
        cal = self.calibration
        confidence: float | None
        reason: Reason | None
        if cal is not None:
            ranked = cal.candidates(refs.ids, scores, top=TOP_CANDIDATES, confirmed=refs.confirmed_ids)
            candidates = tuple(
                MatchCandidate(c.baby_id, c.score, c.probability, has[c.baby_id]) for c in ranked
            )
            confidence = ranked[0].probability
            # named, or why not (the rule cryid eval applies too)
            reason = cast("Reason | None", why_not_named(s, confidence, has[best_id], best, margin))
        else:
            candidates = tuple(
                MatchCandidate(refs.ids[int(k)], float(scores[k]), None, has[refs.ids[int(k)]])
                for k in order[:TOP_CANDIDATES]
            )
            confidence = None
            min_score = s.fallback_min_score if s.min_score is None else s.min_score
            min_margin = s.fallback_min_margin if s.min_margin is None else s.min_margin
            score_ok, margin_ok = best >= min_score, margin >= min_margin
            if score_ok and margin_ok:
                reason = None
            else:
                reason = "below_min_score" if not score_ok else "below_min_margin"
        return Match(
            "identified" if reason is None else "unknown",
            best_id,
            best,
            ru_id,
            ru_score,
            margin,
            confidence,
            candidates,
            n,
            reason,
        )

    def process(self, item: EmbeddedExpiration) -> list[Identification]:
        """Add one expiration: the closed previous episode (if this one starts a new one), then the
        provisional result for this expiration."""
        exp = item.expiration
        start, end = int(exp.start_sample), int(exp.end_sample)
        if end <= start:
            raise ValueError(f"expiration ends ({end}) before it starts ({start})")
        out: list[Identification] = []
        gap = round(self.settings.episode_gap_s * self.sample_rate)
        longest = round(self.settings.max_episode_s * self.sample_rate)
        if self._episode_id is not None and (start - self._end > gap or end - self._start > longest):
            out.append(self._close())
        if self._episode_id is None:
            self._episode_id = str(uuid.uuid4())
            self._start = start
            self._level = -120.0
        self._embeddings.append(l2_normalize(np.asarray(item.embedding, dtype=np.float32).ravel()))
        self._end = max(self._end, end)
        self._level = max(self._level, float(exp.level_dbfs))
        match = self.match(np.mean(self._embeddings, axis=0))  # the whole episode so far
        out.append(
            Identification(
                kind="expiration",
                event_id=str(uuid.uuid4()),
                episode_id=self._episode_id,
                match=match,
                start_sample=start,
                end_sample=end,
                n_expirations=len(self._embeddings),
                level_dbfs=float(exp.level_dbfs),
            )
        )
        return out

    def advance(self, now_sample: int) -> list[Identification]:
        """The stream has reached ``now_sample``: close the episode if no later expiration can join it."""
        if self._episode_id is None:
            return []
        gap = round(self.settings.episode_gap_s * self.sample_rate)
        if now_sample - self._end > gap + self.settle_samples:
            return [self._close()]
        return []

    def flush(self) -> list[Identification]:
        """End of stream: close the current episode."""
        return [self._close()] if self._episode_id is not None else []

    def _close(self) -> Identification:
        episode_id = self._episode_id
        if episode_id is None:  # pragma: no cover - callers check
            raise RuntimeError("no open episode")
        result = Identification(
            kind="episode",
            event_id=str(uuid.uuid4()),
            episode_id=episode_id,
            match=self.match(np.mean(self._embeddings, axis=0)),
            start_sample=self._start,
            end_sample=self._end,
            n_expirations=len(self._embeddings),
            level_dbfs=self._level,
            embeddings=np.stack(self._embeddings).astype(np.float32),
        )
        logger.info(
            "episode %s: %s %s (confidence %s, score %s, %d expirations, %d candidates)",
            result.episode_id[:8],
            result.match.decision,
            result.match.best_baby_id,
            _r(result.match.confidence, 4),
            _r(result.match.score, 4),
            result.n_expirations,
            result.match.n_candidates,
        )
        self.reset()
        return result
