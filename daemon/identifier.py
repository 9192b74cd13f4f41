"""Identifier: embeddings of cry expirations -> which enrolled baby, per expiration and per episode.

A plain synchronous stage. Each expiration's L2-normalised embedding joins the current crying episode
(expirations less than ``episode_gap_s`` apart); the episode's decision compares the re-normalised
mean of its embeddings with every enrolled centroid (cosine): best, runner-up, margin, and
``identified`` when ``score >= min_score`` and ``margin >= min_margin``. ``process`` returns a
provisional ``expiration`` result at once; the final ``episode`` result comes when the episode is over
(``advance`` / ``flush``) or a new one starts. Time is the sample index of the stream.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Literal

import numpy as np

from cryid.daemon.config import IdentifierSettings
from cryid.daemon.events import CryEvent, RunnerUp
from cryid.models.scoring import ReferenceSet, l2_normalize

if TYPE_CHECKING:
    from cryid.models.pipeline import EmbeddedExpiration

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Match:
    """Best and runner-up centroid for one (aggregate) embedding."""

    decision: Literal["identified", "unknown"]
    best_baby_id: str | None
    score: float | None
    runner_up_id: str | None
    runner_up_score: float | None
    margin: float | None

    @property
    def baby_id(self) -> str | None:
        return self.best_baby_id if self.decision == "identified" else None


@dataclass(frozen=True)
class Identification:
    """One result of the identifier, in stream samples; :meth:`to_event` turns it into a payload."""

    kind: Literal["expiration", "episode"]
    event_id: str
    episode_id: str
    match: Match
    start_sample: int
    end_sample: int
    n_expirations: int
    level_dbfs: float
    embeddings: np.ndarray | None = field(default=None, compare=False, repr=False)  # episode: its rows

    def to_event(
        self, stream_start: datetime, sample_rate: int, model_sha256: str, room: str
    ) -> CryEvent:
        """The MQTT payload: sample indices become UTC times from ``stream_start`` and stream offsets."""
        start_s = self.start_sample / sample_rate
        end_s = self.end_sample / sample_rate
        m = self.match
        runner_up = (
            RunnerUp(baby_id=m.runner_up_id, score=m.runner_up_score)
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
            score=m.score,
            runner_up=runner_up,
            margin=m.margin,
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
        centroids: dict[str, np.ndarray],
        sample_rate: int = 16000,
        settle_samples: int = 0,
    ) -> None:
        """``settle_samples``: how long after its start an expiration can still be reported
        (the segmenter's longest expiration plus hang-over); an episode closes only once no
        expiration that could still arrive can belong to it."""
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if settle_samples < 0:
            raise ValueError(f"settle_samples must be >= 0, got {settle_samples}")
        self.sample_rate = sample_rate
        self.settle_samples = settle_samples
        self._ids: list[str] = []
        self._refs = ReferenceSet({})
        self.settings = settings
        self.set_centroids(centroids)
        self.reset()

    # configuration -------------------------------------------------------------------------
    def set_centroids(self, centroids: dict[str, np.ndarray]) -> None:
        """Replace the references by birth centroids only."""
        self.set_references(ReferenceSet(centroids))

    def set_references(self, references: ReferenceSet) -> None:
        """Replace the references (birth and confirmed; after an enrollment, a confirmation, a reload)."""
        self._refs = references
        self._ids = list(references.ids)

    def set_settings(self, settings: IdentifierSettings) -> None:
        """New thresholds and gaps (SIGHUP); the current episode continues under them."""
        self.settings = settings

    @property
    def enrolled(self) -> list[str]:
        return list(self._ids)

    # stage -----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the current episode."""
        self._episode_id: str | None = None
        self._embeddings: list[np.ndarray] = []
        self._start = 0
        self._end = 0
        self._level = -120.0

    def match(self, embedding: np.ndarray) -> Match:
        """Best match of one (possibly aggregate) embedding against the enrolled centroids."""
        s = self.settings
        if not self._ids:
            return Match("unknown", None, None, None, None, None)
        scores = self._refs.scores(embedding)  # a wrong embedding size is a ValueError naming the fix
        order = np.argsort(-scores)
        best = int(order[0])
        score = float(scores[best])
        if len(order) > 1:
            second = int(order[1])
            ru_id, ru_score = self._ids[second], float(scores[second])
            margin = score - ru_score
        else:
            ru_id, ru_score, margin = None, None, score
        ok = score >= s.min_score and margin >= s.min_margin
        return Match(
            "identified" if ok else "unknown",
            self._ids[best],
            round(score, 5),
            ru_id,
            None if ru_score is None else round(ru_score, 5),
            round(margin, 5),
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
        match = self.match(np.mean(self._embeddings, axis=0))
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
            "episode %s: %s %s (score %s, %d expirations)",
            result.episode_id[:8],
            result.match.decision,
            result.match.best_baby_id,
            result.match.score,
            result.n_expirations,
        )
        self.reset()
        return result
