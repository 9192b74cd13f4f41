"""Several microphones and rooms in one daemon (``[[sources]]``): one process, one model, one outbox, one
MQTT connection.

:class:`MultiService` runs one :class:`RoomService` per room. A room service is the daemon's
:class:`~cryid.daemon.service.Service` (its registry polling, ward, stats, dashboard state, signals
handling, shutdown) with the room's sources instead of one: each source is read by its own thread
(:class:`SourceRunner`: gain, flat-line alarm, reopening, its place on the room's time line) and the
room's :class:`~cryid.daemon.fusion.RoomPipeline` turns what the room's microphones heard into one
identification per cry. The embedder (one onnxruntime session), the registry, the outbox and the MQTT
client are shared by every room; each room publishes under its own prefix (``cryid/<room>``, or
``<mqtt.topic_prefix>/<room>`` when a prefix is set) through a :class:`RoomPublisher` view of the one
client. The connection's last will marks the first room offline; the other rooms' ``status`` topics are
published ``online`` at every connection and ``offline`` at a clean stop.

Faults stay local: a source that fails is reported (per source in the stats, ``status/source`` of the
room when all its sources are down) and, for a microphone, reopened with back-off; a microphone that
delivers a flat line for ``source.flat_timeout_s`` is reopened too. Other sources and rooms go on.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cryid.daemon.config import Settings
from cryid.daemon.events import SourceStats, Stats
from cryid.daemon.flatness import FlatDetector
from cryid.daemon.fusion import RoomPipeline
from cryid.daemon.metrics import MetricsSettings
from cryid.daemon.mqtt import OFFLINE, ONLINE, MqttPublisher
from cryid.daemon.outbox import Outbox
from cryid.daemon.roomfeed import RoomFeed
from cryid.daemon.service import Notifier, RegistryLike, Service, load_embedder
from cryid.daemon.sourcelist import ResolvedSource, SourcesError, resolve_sources, rooms_of
from cryid.daemon.sources import AudioChunk, SourceSettings, SourceState, make_source
from cryid.models.audio import SAMPLE_RATE
from cryid.models.errors import CryidError

logger = logging.getLogger(__name__)

REANCHOR_S = 1.0  # a source whose audio arrives this much later than its time line says lost audio


class SourceRunner:
    """One source of a room and what its reader thread keeps: gain, flat detector, time line, failures."""

    def __init__(self, index: int, resolved: ResolvedSource, source: Any, settings: SourceSettings) -> None:
        self.index = index
        self.name = resolved.name
        self.segmenter = resolved.segmenter
        self.source = source
        self.gain = float(10.0 ** (resolved.gain_db / 20.0))
        self.flat = FlatDetector(settings.flat_timeout_s, SAMPLE_RATE)
        self._reopen_at = self.flat.timeout_samples
        self.error: str | None = None  # the last exception of the source (None while it works)
        self.ended = False
        self.reopens = 0  # flat-line reopens (a MicSource counts its own failures in state.outages)
        self.offset: int | None = None  # room sample of the source's sample 0

    def failure(self) -> str | None:
        """Why the source does not deliver, or None."""
        if self.error is not None:
            return self.error
        state = getattr(self.source, "state", None)
        if isinstance(state, SourceState) and not state.ok and state.message != "not opened":
            return state.message
        return None

    @property
    def outages(self) -> int:
        state = getattr(self.source, "state", None)
        return self.reopens + (state.outages if isinstance(state, SourceState) else 0)

    def anchor(self, chunk: AudioChunk, elapsed_s: float) -> int:
        """The room sample of the chunk's start: its end is placed where it arrived (first chunk), and
        again after the source lost audio (an outage: its own count fell behind)."""
        expected = round(elapsed_s * SAMPLE_RATE) - chunk.end_sample
        if self.offset is None:
            self.offset = max(0, expected)
        elif expected - self.offset > REANCHOR_S * SAMPLE_RATE:
            logger.info("source %s lost %.1f s of audio", self.name, (expected - self.offset) / SAMPLE_RATE)
            self.offset = expected
        return self.offset + chunk.start_sample

    def check_flat(self, samples: np.ndarray) -> None:
        """Reader thread: the flat-line alarm; a microphone flat for ``flat_timeout_s`` is reopened (again
        after every further ``flat_timeout_s``)."""
        changed = self.flat.process(samples)
        if changed == "flat":
            logger.warning("source %s flat: %s", self.name, self.flat.describe())
        elif changed == "ok":
            logger.warning("source %s delivers sound again after a flat line", self.name)
            self._reopen_at = self.flat.timeout_samples
        reopen = getattr(self.source, "reopen", None)
        if self.flat.state == "flat" and self.flat.flat_samples >= self._reopen_at and reopen is not None:
            self._reopen_at += self.flat.timeout_samples
            self.reopens += 1
            reopen(f"delivered a flat line ({self.flat.describe()})")


class SourceGroup:
    """A room's sources as the one ``source`` of :class:`Service` (name, counters, combined state, close)."""

    def __init__(self, runners: Sequence[SourceRunner]) -> None:
        self.runners = list(runners)
        self.name = ", ".join(f"{r.name}={getattr(r.source, 'name', '?')}" for r in self.runners)
        self._key: tuple[Any, ...] | None = None
        self._state = SourceState(ok=False, message="not opened", outages=0)

    @property
    def eof(self) -> bool:
        return all(r.ended for r in self.runners)

    @property
    def dropped_chunks(self) -> int:
        return sum(int(getattr(r.source, "dropped_chunks", 0)) for r in self.runners)

    @property
    def overflows(self) -> int:
        return sum(int(getattr(r.source, "overflows", 0)) for r in self.runners)

    @property
    def state(self) -> SourceState:
        """Down when every source of the room is down (one working microphone still hears the room)."""
        down = tuple((r.name, f) for r in self.runners if (f := r.failure()) is not None)
        key = (down, sum(r.outages for r in self.runners))
        if key != self._key:
            self._key = key
            message = "; ".join(f"{name}: {why}" for name, why in down) or "ok"
            self._state = SourceState(ok=len(down) < len(self.runners), message=message, outages=key[1])
        return self._state

    def close(self) -> None:
        for r in self.runners:
            try:
                r.source.close()
            except Exception:  # closing a broken device must not keep the others open
                logger.exception("closing source %s failed", r.name)


class _QuietNotifier(Notifier):
    """Rooms do not talk to systemd; :class:`MultiService` does."""

    def __init__(self) -> None:
        self._n = None
        self.watchdog_s = None


class RoomPublisher:
    """One room's view of the shared :class:`MqttPublisher`: its own prefix, topics and commands."""

    def __init__(self, real: MqttPublisher, room: str, prefix: str) -> None:
        self._real = real
        self.room = room
        self.prefix = prefix
        self.status_topic = f"{prefix}/status"
        self.stats_topic = f"{prefix}/stats"
        self.event_published: Callable[[str], None] | None = None

    def __getattr__(self, name: str) -> Any:  # connected, fatal_error, pump, publish_retained, ...
        return getattr(self._real, name)

    @property
    def on_event_published(self) -> Callable[[str], None] | None:
        return self.event_published

    @on_event_published.setter
    def on_event_published(self, callback: Callable[[str], None] | None) -> None:
        self.event_published = callback

    def event_topic(self, baby_id: str | None) -> str:
        return f"{self.prefix}/baby/{baby_id}" if baby_id else f"{self.prefix}/unknown"

    def command_topic(self, verb: str) -> str:
        return f"{self.prefix}/cmd/{verb}"

    def set_command_sink(self, verbs: Sequence[str], sink: Callable[[str, bytes], None]) -> None:
        for verb in verbs:
            self._real.subscribe(self.command_topic(verb), lambda _t, payload, v=verb: sink(v, payload))

    def publish_result(self, payload: str) -> bool:
        return self._real.publish_to(self.command_topic("result"), payload)

    def publish_stats(self, payload: str) -> None:
        self._real.publish_to(self.stats_topic, payload)

    def start(self) -> None:
        """The shared client is started by :class:`MultiService`."""

    def stop(self, timeout_s: float = 2.0) -> None:
        """The shared client is stopped by :class:`MultiService`."""


class RoomService(Service):
    """The daemon for one room of several: :class:`Service` with a reader thread per source."""

    def __init__(
        self,
        settings: Settings,
        runners: Sequence[SourceRunner],
        embedder: Any,
        registry: RegistryLike,
        outbox: Outbox,
        publisher: RoomPublisher,
        config_file: Path | None = None,
    ) -> None:
        super().__init__(settings, SourceGroup(runners), embedder, registry, outbox, publisher, config_file)  # type: ignore[arg-type]
        self.runners = list(runners)
        self.room_pipeline = RoomPipeline(  # the references arrive with the first registry poll
            embedder, [(r.name, r.segmenter) for r in self.runners], settings.identifier, room=settings.room,
            calibration=getattr(getattr(embedder, "manifest", None), "calibration", None), observer=self.plug,
        )  # fmt: skip
        self.pipeline = self.room_pipeline
        self.counters = self.pipeline.health
        self.notifier = _QuietNotifier()
        room_dir = Path(settings.state_dir).expanduser() / "rooms" / settings.room
        room_dir.mkdir(parents=True, exist_ok=True)
        self.dashboard = RoomFeed(publisher, settings.room, settings.dashboard.crying_timeout_s, room_dir)  # type: ignore[arg-type]
        self._t0 = time.monotonic()

    def _reader(self) -> None:
        self._t0 = time.monotonic()
        threads = [
            threading.Thread(target=self._read_source, args=(r,), name=f"cryid-reader-{r.name}", daemon=True)
            for r in self.runners
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _read_source(self, r: SourceRunner) -> None:
        """One source's thread: read, reopen on failure (microphones), hand chunks to the room's pipeline."""
        try:
            while not self._stop.is_set():
                try:
                    chunk = r.source.read(0.5)
                except Exception as exc:  # thread boundary: this source only, the room goes on
                    logger.exception("source %s failed", r.name)
                    r.error = f"source {r.name} failed: {exc}"
                    if getattr(r.source, "reopen", None) is None:
                        break  # a file or stdin: for good
                    self._stop.wait(1.0)
                    continue
                if chunk is None:
                    if r.source.eof:
                        break
                    continue
                r.error = None
                samples = chunk.samples * np.float32(r.gain) if r.gain != 1.0 else chunk.samples
                room_start = r.anchor(chunk, time.monotonic() - self._t0)
                self.plug.audio_arrived(AudioChunk(samples, room_start))
                r.check_flat(samples)
                self._put((r.index, samples, room_start))
        finally:
            r.ended = True
            self._put((r.index, None, None))

    def _put(self, item: tuple[int, np.ndarray | None, int | None]) -> None:
        while True:
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                if self._pipeline_done.is_set() or (self._stop.is_set() and item[1] is not None):
                    return

    def _pipeline(self) -> None:
        health = self.counters
        pipeline = self.room_pipeline
        ended = 0
        try:
            while ended < len(self.runners):
                health.beat()
                try:
                    i, samples, room_start = self.queue.get(timeout=0.5)
                except queue.Empty:
                    continue
                if samples is None:
                    ended += 1
                    outputs = pipeline.end_of(i)
                else:
                    outputs = pipeline.feed_from(i, samples, room_start)
                t0 = time.perf_counter()
                for out in outputs:
                    self._emit(out)
                health.add_busy(time.perf_counter() - t0)
            self.plug.source_ended = True
            for out in pipeline.flush():
                self._emit(out)
        except Exception as exc:  # thread boundary
            logger.exception("pipeline of room %s failed", self.settings.room)
            self.fatal = f"pipeline of room {self.settings.room} failed: {exc}"
        finally:
            self._pipeline_done.set()

    def stats(self) -> Stats:
        pipeline = self.room_pipeline
        per = []
        for r in self.runners:
            why = r.failure() or ("the source ended" if r.ended else None)
            level = r.flat.level_dbfs()
            per.append(
                SourceStats(
                    name=r.name,
                    ok=why is None,
                    error=why,
                    flat=r.flat.state == "flat",
                    level_dbfs=None if level is None else round(level, 1),
                    noise_floor_dbfs=round(pipeline.noise_floor_dbfs(r.index), 1),
                    stream_offset_s=round(pipeline.samples_of(r.index) / SAMPLE_RATE, 2),
                    dropped_frames=int(getattr(r.source, "dropped_chunks", 0))
                    + int(getattr(r.source, "overflows", 0)),
                    reopens=r.outages,
                )
            )
        return super().stats().model_copy(update={"sources": per})

    def _shutdown(self, threads: list[threading.Thread]) -> int:
        self._check_source_state()  # the retained status/source says why the room stopped hearing
        self.plug.tick(self._enrolled, self.outbox.size(), getattr(self._source_state, "outages", 0))
        return super()._shutdown(threads)

    def close(self) -> None:
        """The room's sources and metrics port; the shared registry and outbox are closed by MultiService."""
        self.plug.close()
        self.source.close()  # type: ignore[attr-defined]


def room_prefix(settings: Settings, room: str, several: bool) -> str:
    """``cryid/<room>``; with a ``mqtt.topic_prefix`` and several rooms, ``<topic_prefix>/<room>``."""
    if several and settings.mqtt.topic_prefix:
        return f"{settings.mqtt.topic_prefix.rstrip('/')}/{room}"
    return settings.mqtt.prefix(room)


class MultiService:
    """Every room of ``[[sources]]`` in one process: runs the room services, owns the shared parts."""

    def __init__(
        self,
        settings: Settings,
        rooms: Sequence[RoomService],
        publisher: MqttPublisher,
        registry: Any,
        outbox: Outbox,
    ) -> None:
        self.settings = settings
        self.rooms = list(rooms)
        self.publisher = publisher
        self.registry = registry
        self.outbox = outbox
        self.notifier = Notifier()
        self.codes: dict[str, int] = {}
        self._stop = threading.Event()
        self._reload = threading.Event()

    @property
    def fatal(self) -> str | None:
        return next((r.fatal for r in self.rooms if r.fatal), None) or self.publisher.fatal_error

    def request_stop(self) -> None:
        self._stop.set()
        for r in self.rooms:
            r.request_stop()

    def request_reload(self) -> None:
        for r in self.rooms:
            r.request_reload()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())

    def _published(self, event_id: str) -> None:  # paho's or a room's thread: each room's latency metric
        for r in self.rooms:
            callback = r.publisher.on_event_published
            if callback is not None:
                callback(event_id)

    def _status(self, payload: str) -> None:
        for r in self.rooms[1:]:  # the first room's status is the connection's own (and its last will)
            self.publisher.publish_retained(r.publisher.status_topic, payload)

    def run(self) -> int:
        """Run every room until stopped or every source has ended; the worst room's exit status."""
        self.publisher.on_event_published = self._published
        self.publisher.start()
        threads = []
        for r in self.rooms:

            def run_room(room: RoomService = r) -> None:
                try:
                    self.codes[room.settings.room] = room.run()
                except Exception:  # thread boundary: the other rooms go on; the exit status says it
                    logger.exception("room %s failed", room.settings.room)
                    self.codes[room.settings.room] = 1

            threads.append(
                threading.Thread(target=run_room, name=f"cryid-room-{r.settings.room}", daemon=True)
            )
        for t in threads:
            t.start()
        self.notifier.notify("READY=1")
        seen = 0
        next_dog = time.monotonic()
        while any(t.is_alive() for t in threads):
            if self.publisher.connected and self.publisher.connects != seen:
                seen = self.publisher.connects
                self._status(ONLINE)
            now = time.monotonic()
            if self.notifier.watchdog_s and now >= next_dog:
                if all(now - r.counters.heartbeat < 10.0 for r in self.rooms):
                    self.notifier.notify("WATCHDOG=1")
                next_dog = now + self.notifier.watchdog_s
            time.sleep(0.2)
        self.notifier.notify("STOPPING=1")
        self._status(OFFLINE)
        self.publisher.stop()
        return max(self.codes.values()) if len(self.codes) == len(self.rooms) else 1

    def close(self) -> None:
        for part in [*self.rooms, self.registry, self.outbox]:
            try:
                part.close()
            except Exception:  # closing must release the rest even if one part is broken
                logger.exception("closing %s failed", type(part).__name__)


def open_source(rs: ResolvedSource, settings: SourceSettings) -> Any:
    """Open one ``[[sources]]`` entry: a file is played at real speed; a wrong one is refused by name."""
    source = make_source(rs.spec, settings.model_copy(update={"device": rs.device}), realtime=True)
    try:
        source.open()
    except (CryidError, OSError) as exc:
        source.close()
        raise SourcesError(f"sources: {rs.name}: {exc}") from exc
    return source


def build_multi_service(settings: Settings, config_file: Path | None = None) -> MultiService:
    """Open the real parts for every ``[[sources]]`` entry: sources, one model, registry, outbox, client."""
    from cryid.enrollment.registry import Registry

    rooms = rooms_of(resolve_sources(settings))
    opened: list[Any] = []
    try:
        runners: dict[str, list[SourceRunner]] = {}
        for room, members in rooms.items():
            for i, rs in enumerate(members):
                source = open_source(rs, settings.source)
                opened.append(source)
                runners.setdefault(room, []).append(SourceRunner(i, rs, source, settings.source))
        embedder = load_embedder(settings)
        registry = Registry.open(Path(settings.state_dir).expanduser(), settings.registry)
        opened.append(registry)
        outbox = Outbox.open(settings.state_dir, settings.outbox)
        opened.append(outbox)
        several = len(rooms) > 1
        first = next(iter(rooms))
        mqtt = settings.mqtt
        if several and mqtt.topic_prefix:
            mqtt = mqtt.model_copy(update={"topic_prefix": room_prefix(settings, first, True)})
        publisher = MqttPublisher(mqtt, first, outbox)
        services = []
        for n, room in enumerate(rooms):
            view = RoomPublisher(publisher, room, room_prefix(settings, room, several))
            room_settings = settings.model_copy(
                update={"room": room, "metrics": settings.metrics if n == 0 else MetricsSettings()}
            )  # one metrics port: the first room's
            services.append(
                RoomService(room_settings, runners[room], embedder, registry, outbox, view, config_file)
            )
            logger.info("room %s: sources %s, topics %s/...", room, services[-1].source.name, view.prefix)  # type: ignore[attr-defined]
    except BaseException:
        for part in reversed(opened):
            part.close()
        raise
    return MultiService(settings, services, publisher, registry, outbox)
