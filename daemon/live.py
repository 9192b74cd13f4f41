"""The live pipeline without threads: audio chunks in, identifications (with their events) out.

:class:`LivePipeline` is segmenter -> embedder -> identifier as one synchronous stage. ``feed`` takes a
chunk of float32 16 kHz samples (any size: the result does not depend on how the stream is cut) and
returns what the chunk produced; ``flush`` ends the stream (the expiration being heard is finished,
the episode gets its final event). ``apply`` hands it new references or identifier settings; it may
be called from any thread: updates wait on a queue that ``feed`` and ``flush`` drain first, in order,
so none is lost and the next expiration is scored with them.

:class:`PipelineHealth` holds the figures the pipeline counts and another thread reports: totals
(samples, expirations, episodes, events) and per-interval figures (busy time, audio time, input
level) that :meth:`~PipelineHealth.snapshot_and_reset` reads and resets under one lock.

The service (:mod:`cryid.daemon.service`) owns the threads and calls this from its pipeline thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Protocol

import numpy as np

from cryid.daemon.config import IdentifierSettings
from cryid.daemon.events import CryEvent
from cryid.daemon.identifier import Identification, Identifier
from cryid.daemon.stages import StageStamps
from cryid.models.audio import SAMPLE_RATE
from cryid.models.config import SegmenterSettings
from cryid.models.pipeline import EmbeddedExpiration
from cryid.models.scoring import ReferenceSet
from cryid.models.segmenter import Expiration, Segmenter

if TYPE_CHECKING:
    from cryid.models.calibration import Calibration

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewReferences:
    """The room's references changed (enrollment, move, confirmation, reload)."""

    references: ReferenceSet


@dataclass(frozen=True)
class NewIdentifierSettings:
    """New thresholds and gaps (SIGHUP); the current episode continues under them."""

    settings: IdentifierSettings


PipelineUpdate = NewReferences | NewIdentifierSettings


@dataclass(frozen=True)
class Output:
    """One identification and its payload (UTC times from the pipeline's ``stream_start``); ``stamps``:
    when an expiration event passed each stage so far (:mod:`cryid.daemon.stages`)."""

    identification: Identification
    event: CryEvent
    stamps: StageStamps | None = None


@dataclass(frozen=True)
class HealthSnapshot:
    """Totals since the start, and the per-interval figures since the previous snapshot."""

    samples: int
    expirations: int
    episodes: int
    events: int
    nonfinite_samples: int
    nonfinite: bool  # the last chunk was mostly NaN / inf
    busy_s: float
    audio_s: float
    sumsq: float
    n_level: int

    @property
    def realtime_factor(self) -> float | None:
        return self.busy_s / self.audio_s if self.audio_s > 0 else None

    @property
    def level_dbfs(self) -> float | None:
        return 10.0 * float(np.log10(self.sumsq / self.n_level + 1e-12)) if self.n_level else None


class PipelineHealth:
    """The pipeline's counters behind one lock: written by the pipeline, read by the main thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples = self._expirations = self._episodes = self._events = 0
        self._nonfinite_samples = 0
        self._nonfinite = False
        self._busy_s = self._audio_s = self._sumsq = 0.0
        self._n_level = 0
        self._heartbeat = time.monotonic()
        self._waiting = False

    def beat(self) -> None:
        """The pipeline starts on a chunk (it is busy until the next :meth:`waiting`)."""
        self._heartbeat = time.monotonic()
        self._waiting = False

    def waiting(self) -> None:
        """The pipeline waits for audio: alive, however long the wait (a quiet source is not a stall)."""
        self._heartbeat = time.monotonic()
        self._waiting = True

    @property
    def heartbeat(self) -> float:
        """``time.monotonic()`` of the pipeline's last sign of life (now, while it waits for audio)."""
        return time.monotonic() if self._waiting else self._heartbeat

    @property
    def samples(self) -> int:
        return self._samples

    @property
    def expirations(self) -> int:
        return self._expirations

    @property
    def episodes(self) -> int:
        return self._episodes

    @property
    def events(self) -> int:
        return self._events

    def chunk(
        self, samples_seen: int, audio_s: float, sumsq: float, n: int, nonfinite_samples: int, nonfinite: bool
    ) -> None:
        """A chunk was processed: the stream position, its duration and energy, the NaN/inf figures."""
        with self._lock:
            self._samples = samples_seen
            self._audio_s += audio_s
            self._sumsq += sumsq
            self._n_level += n
            self._nonfinite_samples = nonfinite_samples
            self._nonfinite = nonfinite

    def add_busy(self, seconds: float) -> None:
        with self._lock:
            self._busy_s += seconds

    def expiration(self) -> None:
        with self._lock:
            self._expirations += 1

    def event(self, kind: str) -> None:
        with self._lock:
            self._events += 1
            if kind == "episode":
                self._episodes += 1

    def snapshot_and_reset(self) -> HealthSnapshot:
        """All figures at one instant; the per-interval ones start again from zero."""
        with self._lock:
            snap = HealthSnapshot(
                samples=self._samples,
                expirations=self._expirations,
                episodes=self._episodes,
                events=self._events,
                nonfinite_samples=self._nonfinite_samples,
                nonfinite=self._nonfinite,
                busy_s=self._busy_s,
                audio_s=self._audio_s,
                sumsq=self._sumsq,
                n_level=self._n_level,
            )
            self._busy_s = self._audio_s = self._sumsq = 0.0
            self._n_level = 0
        return snap


class EmbedderLike(Protocol):
    sha256: str

    def embed(self, wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray: ...


class Observer(Protocol):
    """Hooks for metrics and the flat-microphone alarm (:class:`cryid.daemon.integrations.Integrations`)."""

    def audio_processed(self, samples: np.ndarray) -> None: ...

    def embedded(self, seconds: float) -> None: ...


class LivePipeline:
    """segmenter -> embedder -> identifier, synchronous; updates from other threads through a queue."""

    def __init__(
        self,
        embedder: EmbedderLike,
        segmenter: SegmenterSettings,
        identifier: IdentifierSettings,
        references: ReferenceSet | None = None,
        *,
        room: str,
        calibration: Calibration | None = None,
        health: PipelineHealth | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.embedder = embedder
        self.sha = embedder.sha256
        self.room = room
        self.health = health if health is not None else PipelineHealth()
        self.observer = observer
        self.stream_start = datetime.now(timezone.utc)  # the wall time of sample 0 (the service sets it)
        self.updates_applied = 0
        self._segmenter = Segmenter(segmenter, SAMPLE_RATE)
        settle = (segmenter.max_expiration_ms + segmenter.hangover_ms + segmenter.pre_roll_ms) * SAMPLE_RATE
        self._identifier = Identifier(
            identifier,
            references if references is not None else ReferenceSet({}),
            SAMPLE_RATE,
            settle_samples=settle // 1000,
            calibration=calibration,
        )
        self._updates: queue.SimpleQueue[PipelineUpdate] = queue.SimpleQueue()

    @property
    def confirmed_weight(self) -> float:
        """Weight of confirmed-cry references (the model's calibration's; fixed for a run)."""
        return self._identifier.confirmed_weight

    @property
    def enrolled(self) -> list[str]:
        """The babies of the references in use (pipeline thread)."""
        return self._identifier.enrolled

    @property
    def gate_shut_s(self) -> float:
        """Seconds the segmenter's gate has stayed shut outside an expiration (pipeline thread)."""
        return self._segmenter.gate_shut_s

    @property
    def identifier_settings(self) -> IdentifierSettings:
        """The identifier settings in use (pipeline thread)."""
        return self._identifier.settings

    def apply(self, update: PipelineUpdate) -> None:
        """Any thread: the update takes effect at the start of the next ``feed`` or ``flush``."""
        if not isinstance(update, NewReferences | NewIdentifierSettings):
            raise TypeError(f"not a pipeline update: {type(update).__name__}")
        self._updates.put(update)

    def feed(self, samples: np.ndarray, read_at: float | None = None) -> list[Output]:
        """One chunk of the stream (float32, 16 kHz, any length): the identifications it completed.

        ``read_at``: ``time.monotonic()`` when the source delivered the chunk; the expiration events
        it completes are then stamped from the moment their last sample was heard."""
        self._drain()
        t0 = time.perf_counter()
        samples = np.asarray(samples, dtype=np.float32)
        seg = self._segmenter
        bad = seg.nonfinite_samples
        out: list[Output] = []
        exps = seg.process(samples)
        if exps:
            detected = time.monotonic()
            for exp in exps:
                stamps = StageStamps(detected=detected)
                if read_at is not None:  # the chunk ends at samples_seen: its last sample was heard then
                    heard = read_at - (seg.samples_seen - exp.end_sample) / SAMPLE_RATE
                    stamps = stamps.at(audio_end=heard, read=read_at)
                out += self._identify(exp, stamps)
        bad = seg.nonfinite_samples - bad
        if bad:
            samples = np.nan_to_num(samples, nan=0.0, posinf=0.0, neginf=0.0)
        if self.observer is not None:
            self.observer.audio_processed(samples)
        out += self._outputs(self._identifier.advance(seg.samples_seen))
        self.health.chunk(
            seg.samples_seen,
            samples.size / SAMPLE_RATE,
            float(np.dot(samples, samples)),
            samples.size,
            seg.nonfinite_samples,
            2 * bad > samples.size,  # a source delivering mostly NaN is not ok
        )
        self.health.add_busy(time.perf_counter() - t0)
        return out

    def flush(self) -> list[Output]:
        """The end of the stream: the last expiration and the episode's final event."""
        self._drain()
        out: list[Output] = []
        for exp in self._segmenter.flush():
            out += self._identify(exp, StageStamps(detected=time.monotonic()))
        return out + self._outputs(self._identifier.flush())

    def _drain(self) -> None:
        while True:
            try:
                update = self._updates.get_nowait()
            except queue.Empty:
                return
            if isinstance(update, NewReferences):
                self._identifier.set_references(update.references)
            else:
                self._identifier.set_settings(update.settings)
            self.updates_applied += 1

    def _identify(self, exp: Expiration, stamps: StageStamps) -> list[Output]:
        t0 = time.perf_counter()
        try:
            emb = self.embedder.embed(exp.audio, SAMPLE_RATE)
        except ValueError as exc:  # one bad expiration must not stop the ward's daemon
            logger.error("expiration at %.2f s skipped: %s", exp.start_sample / SAMPLE_RATE, exc)
            return []
        stamps = stamps.at(embedded=time.monotonic())
        self.health.expiration()
        if self.observer is not None:
            self.observer.embedded(time.perf_counter() - t0)
        return self._outputs(self._identifier.process(EmbeddedExpiration(exp, emb)), stamps)

    def _outputs(self, results: list[Identification], stamps: StageStamps | None = None) -> list[Output]:
        out = []
        for r in results:
            event = r.to_event(self.stream_start, SAMPLE_RATE, self.sha, self.room)
            st = None
            if stamps is not None and r.kind == "expiration":
                st = stamps.at(identified=time.monotonic())
            out.append(Output(r, event, st))
            self.health.event(r.kind)
        return out
