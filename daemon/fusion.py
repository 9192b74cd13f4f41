"""One room heard by several microphones: one segmenter per microphone, one identifier (one episode) per room.

:class:`RoomPipeline` is :class:`~cryid.daemon.live.LivePipeline` for a room with several sources. Each
source has its own segmenter (its own segmenter overrides, its own noise floor); its expirations are put on
the room's time line (room samples: the service says, with each chunk, which room sample the chunk starts
at, so microphones opened at different moments line up). Expirations of different microphones that overlap
in time, or lie less than ``identifier.same_cry_ms`` apart, are one cry, also when the microphones cut it
differently (a far microphone may hear one long expiration as several short ones). The cry is identified
once, from the microphone that heard it clearest (highest level over that microphone's noise floor): its
expirations are embedded and give the events; each event's ``levels_dbfs`` holds the level each
microphone heard it at. A cry is decided once every source still delivering audio has heard
``same_cry_ms`` past its end with no expiration of its own still open over it (a source more than
``MAX_SKEW_S`` behind the others holds nothing back); a microphone that reports it after that is a late
duplicate and is dropped (counted in :attr:`RoomPipeline.duplicates`). With one source nothing waits.

Each expiration event carries its stage stamps (:mod:`cryid.daemon.stages`) from the chunk of the source
that heard it; with several sources ``detected_to_embedded`` includes the wait for the room's other
microphones (``same_cry_ms`` and their hang-over past the cry).

Thread-free like :class:`LivePipeline`: the service feeds it from one thread, ``apply`` from any.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cryid.daemon.config import IdentifierSettings
from cryid.daemon.identifier import Identification
from cryid.daemon.live import EmbedderLike, LivePipeline, Observer, Output, PipelineHealth
from cryid.daemon.stages import StageStamps
from cryid.models.audio import SAMPLE_RATE
from cryid.models.config import SegmenterSettings
from cryid.models.pipeline import EmbeddedExpiration
from cryid.models.scoring import ReferenceSet
from cryid.models.segmenter import Expiration, Segmenter

if TYPE_CHECKING:
    from cryid.models.calibration import Calibration

logger = logging.getLogger(__name__)

MAX_SKEW_S = 1.0  # a source this far behind the room's most advanced one no longer holds decisions back


@dataclass(frozen=True)
class _Heard:
    source: int
    expiration: Expiration  # in room samples
    snr_db: float  # level over the source's noise floor
    stamps: StageStamps  # heard, read, detected (cryid.daemon.stages)


@dataclass
class _Cry:
    """Expirations of one sound, from one or several microphones, in room samples."""

    start: int
    end: int
    heard: list[_Heard] = field(default_factory=list)

    def add(self, h: _Heard) -> None:
        self.heard.append(h)
        self.start = min(self.start, h.expiration.start_sample)
        self.end = max(self.end, h.expiration.end_sample)

    def near(self, start: int, end: int, tolerance: int) -> bool:
        return start <= self.end + tolerance and end >= self.start - tolerance


def _settle(s: SegmenterSettings) -> int:
    return (s.max_expiration_ms + s.hangover_ms + s.pre_roll_ms) * SAMPLE_RATE // 1000


class RoomPipeline(LivePipeline):
    """Several sources of one room -> one identifier; ``feed_from(i, samples, room_start)`` per chunk."""

    def __init__(
        self,
        embedder: EmbedderLike,
        sources: Sequence[tuple[str, SegmenterSettings]],
        identifier: IdentifierSettings,
        references: ReferenceSet | None = None,
        *,
        room: str,
        calibration: Calibration | None = None,
        health: PipelineHealth | None = None,
        observer: Observer | None = None,
    ) -> None:
        if not sources:
            raise ValueError("a room needs at least one source")
        super().__init__(
            embedder, sources[0][1], identifier, references, room=room, calibration=calibration,
            health=health, observer=observer,
        )  # fmt: skip
        self.names = [name for name, _ in sources]
        self._settings = [s for _, s in sources]
        self._segs = [Segmenter(s, SAMPLE_RATE) for s in self._settings]
        n = len(sources)
        self._offset = [0] * n  # room sample of each segmenter's sample 0
        self._pos = [0] * n  # room sample each source has delivered up to
        self._ended = [False] * n
        self._pending: list[_Cry] = []
        self._recent: deque[_Cry] = deque(maxlen=64)  # decided cries, to recognise late duplicates
        self._levels: dict[str, dict[str, float]] = {}  # episode id -> source name -> loudest level
        self.duplicates = 0
        hold = (self.identifier_settings.same_cry_ms + 1000 * MAX_SKEW_S) * SAMPLE_RATE // 1000
        self._identifier.settle_samples = max(_settle(s) for s in self._settings) + int(hold)

    # the service's calls ------------------------------------------------------------------------
    def noise_floor_dbfs(self, i: int) -> float:
        return self._segs[i].noise_floor_dbfs

    def samples_of(self, i: int) -> int:
        return self._segs[i].samples_seen

    @property
    def gate_shut_s(self) -> float:
        """Seconds every source still delivering has had its gate shut: how long the room has been quiet."""
        live = [seg.gate_shut_s for seg, ended in zip(self._segs, self._ended, strict=True) if not ended]
        return min(live) if live else 0.0

    def feed_from(
        self, i: int, samples: np.ndarray, room_start: int | None = None, read_at: float | None = None
    ) -> list[Output]:
        """A chunk of source ``i``; ``room_start``: the room sample its first sample is at (None: right
        after the source's previous chunk); ``read_at``: ``time.monotonic()`` when the source delivered it
        (the events' stage stamps start there, as in :meth:`LivePipeline.feed`)."""
        self._drain()
        t0 = time.perf_counter()
        samples = np.asarray(samples, dtype=np.float32)
        seg = self._segs[i]
        if room_start is not None:
            self._offset[i] = int(room_start) - seg.samples_seen
        bad = seg.nonfinite_samples
        exps = seg.process(samples)
        if exps:
            detected = time.monotonic()
            for exp in exps:
                stamps = StageStamps(detected=detected)
                if read_at is not None:  # the chunk ends at samples_seen: its last sample was heard then
                    heard = read_at - (seg.samples_seen - exp.end_sample) / SAMPLE_RATE
                    stamps = stamps.at(audio_end=heard, read=read_at)
                self._heard(i, exp, stamps)
        bad = seg.nonfinite_samples - bad
        if bad:
            samples = np.nan_to_num(samples, nan=0.0, posinf=0.0, neginf=0.0)
        self._pos[i] = self._offset[i] + seg.samples_seen
        if self.observer is not None:
            self.observer.audio_processed(samples)
        out = self._decide()
        self.health.chunk(
            max(self._pos), samples.size / SAMPLE_RATE, float(np.dot(samples, samples)), samples.size,
            sum(s.nonfinite_samples for s in self._segs), 2 * bad > samples.size,
        )  # fmt: skip
        self.health.add_busy(time.perf_counter() - t0)
        return out

    def end_of(self, i: int) -> list[Output]:
        """Source ``i`` ended or failed for good: its last expiration; the others no longer wait for it."""
        self._drain()
        if self._ended[i]:
            return []
        for exp in self._segs[i].flush():
            self._heard(i, exp, StageStamps(detected=time.monotonic()))
        self._ended[i] = True
        return self._decide()

    def flush(self) -> list[Output]:
        """The end of every stream: the last expirations, every cry decided, the episode's final event."""
        self._drain()
        for i in range(len(self._segs)):
            if not self._ended[i]:
                for exp in self._segs[i].flush():
                    self._heard(i, exp, StageStamps(detected=time.monotonic()))
                self._ended[i] = True
        out = self._decide(everything=True)
        return out + self._outputs(self._identifier.flush())

    # inside -------------------------------------------------------------------------------------
    def _window(self) -> int:
        return self.identifier_settings.same_cry_ms * SAMPLE_RATE // 1000

    def _heard(self, i: int, exp: Expiration, stamps: StageStamps) -> None:
        off = self._offset[i]
        e = dataclasses.replace(exp, start_sample=exp.start_sample + off, end_sample=exp.end_sample + off)
        heard = _Heard(i, e, float(exp.level_dbfs) - self._segs[i].noise_floor_dbfs, stamps)
        w = self._window()
        if len(self._segs) > 1 and any(c.near(e.start_sample, e.end_sample, w) for c in self._recent):
            self.duplicates += 1  # heard after the cry was decided without this microphone
            logger.debug("%s: late copy of a cry at %d dropped", self.names[i], e.start_sample)
            return
        cry = _Cry(e.start_sample, e.end_sample)
        if len(self._segs) > 1:  # one sound: every pending cry this expiration overlaps (or nearly)
            for other in [c for c in self._pending if c.near(e.start_sample, e.end_sample, w)]:
                self._pending.remove(other)
                for h in other.heard:
                    cry.add(h)
        cry.add(heard)
        self._pending.append(cry)
        self._pending.sort(key=lambda c: c.start)

    def _clock(self) -> int:
        """The room's time: the slowest source still delivering, unless it lags more than MAX_SKEW_S."""
        live = [p for p, ended in zip(self._pos, self._ended, strict=True) if not ended]
        newest = max(self._pos)
        if not live:
            return newest
        return max(min(live), newest - int(MAX_SKEW_S * SAMPLE_RATE))

    def _settled(self, cry: _Cry) -> bool:
        """No source still delivering can add to the cry: each has heard past it (its hang-over and
        ``same_cry_ms``) with no expiration of its own open over it. A source lagging more than MAX_SKEW_S
        behind the newest one is not waited for."""
        w = self._window()
        lagging = max(self._pos) - int(MAX_SKEW_S * SAMPLE_RATE)
        for j, seg in enumerate(self._segs):
            if self._ended[j] or self._pos[j] < lagging:
                continue
            if self._pos[j] < cry.end + w + self._settings[j].hangover_ms * SAMPLE_RATE // 1000:
                return False
            opened = seg.open_since
            if opened is not None and opened + self._offset[j] <= cry.end + w:
                return False
        return True

    def _decide(self, everything: bool = False) -> list[Output]:
        out: list[Output] = []
        while self._pending:  # in order of start, so the identifier sees the cries in order
            cry = self._pending[0]
            if not (everything or len(self._segs) == 1 or self._settled(cry)):
                break
            self._pending.pop(0)
            self._recent.append(cry)
            out += self._identify_cry(cry)
        return out + self._outputs(self._identifier.advance(self._clock()))

    def _identify_cry(self, cry: _Cry) -> list[Output]:
        """The clearest microphone's expirations of the cry, embedded and identified; every microphone's
        level of it in the events."""
        best = max(cry.heard, key=lambda h: (h.snr_db, -h.source)).source
        levels: dict[str, float] = {}
        for h in cry.heard:
            name = self.names[h.source]
            levels[name] = max(round(h.expiration.level_dbfs, 2), levels.get(name, -200.0))
        out: list[Output] = []
        for h in sorted((h for h in cry.heard if h.source == best), key=lambda h: h.expiration.start_sample):
            exp = h.expiration
            t0 = time.perf_counter()
            try:
                emb = self.embedder.embed(exp.audio, SAMPLE_RATE)
            except ValueError as exc:  # one bad expiration must not stop the ward's daemon
                logger.error("expiration at %.2f s skipped: %s", exp.start_sample / SAMPLE_RATE, exc)
                continue
            stamps = h.stamps.at(embedded=time.monotonic())
            self.health.expiration()
            if self.observer is not None:
                self.observer.embedded(time.perf_counter() - t0)
            out += self._outputs(self._identifier.process(EmbeddedExpiration(exp, emb)), stamps, levels)
        return out

    def _outputs(
        self,
        results: list[Identification],
        stamps: StageStamps | None = None,
        levels: dict[str, float] | None = None,
    ) -> list[Output]:
        out = super()._outputs(results, stamps)
        if len(self._segs) == 1:
            return out
        fixed = []
        for o in out:
            ep = o.event.episode_id
            if o.identification.kind == "expiration":
                kept = self._levels.setdefault(ep, {})
                for name, level in (levels or {}).items():
                    kept[name] = max(level, kept.get(name, -200.0))
                lv = levels
            else:
                lv = self._levels.pop(ep, None)
            fixed.append(Output(o.identification, o.event.model_copy(update={"levels_dbfs": lv}), o.stamps))
        return fixed
