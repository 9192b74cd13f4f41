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
client; the client's callbacks (PUBLISH handed, PUBACK, (dis)connected) reach every room.

Availability: MQTT gives a connection one last will. With one room it is the room's ``status`` (as for
``cryid run`` without ``[[sources]]``). With several rooms it is the daemon's own retained
``<base>/status`` (``<base>``: ``mqtt.topic_prefix``, else ``cryid``; ``online`` at every connection,
``offline`` at a clean stop and as the will); each room's ``<prefix>/status`` is published ``online`` at
every connection and ``offline`` at a clean stop, and a room is live while both are ``online`` (Home
Assistant's entities list both topics, ``availability_mode: all``). One connection per room, each with its
own will, does not work with the shipped broker configuration, which ties client ids to users.

Every room gets what the latency work gives the single-room daemon: its reader threads hand on when each
chunk was read, so the events carry their stage stamps and the room's stats their ``stages``; the room's
sources read ``source.quiet_chunk_ms`` blocks once every source's gate has been shut ``QUIET_AFTER_S``
(and go back to chunks, cutting the blocks being read short, when one opens); the pipeline thread blocks
on its queue and each room's main thread sleeps until something happens (an event stored, a PUBACK, a
command, a signal) or a duty is due; each main thread fsyncs the shared outbox after its room's events.

``metrics.port``: one server for the daemon; ``/metrics`` holds every room's figures with a ``room``
label, and per source (``source`` label) ``cryid_source_up``, ``cryid_source_flat``,
``cryid_mic_level_dbfs``, ``cryid_source_flats_total`` and ``cryid_source_reopens_total``; ``/healthz``
is ``200 ok`` while every room is healthy, else ``503`` naming each room that is not.

systemd (``Type=notify``, ``NOTIFY_SOCKET``): the daemon says ``READY=1`` once every room has started
(its threads run and its registry was read), ``WATCHDOG=1`` while every room's pipeline is alive, and a
``STATUS=`` line naming the broker, each room's state and the outbox when it changes (looked at every
``STATUS_CHECK_S``), e.g. ``connected, 2 rooms; ward1: listening; ward2: microphone down; outbox 0``.

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
from cryid.daemon.metrics import MetricsServer, MetricsSettings, RoomsMetrics
from cryid.daemon.mqtt import OFFLINE, ONLINE, MqttPublisher
from cryid.daemon.outbox import Outbox
from cryid.daemon.service import Notifier, RegistryLike, Service, load_embedder, reload_settings
from cryid.daemon.sourcelist import ResolvedSource, SourcesError, resolve_sources, rooms_of
from cryid.daemon.sources import AudioChunk, SourceSettings, SourceState, make_source
from cryid.models.audio import SAMPLE_RATE
from cryid.models.errors import CryidError

logger = logging.getLogger(__name__)

REANCHOR_S = 1.0  # a source whose audio arrives this much later than its time line says lost audio
STATUS_CHECK_S = 2.0  # under systemd: how often the rooms' state is looked at for STATUS= (sent on change)


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
        self.flats = 0  # times the source went flat
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
            self.flats += 1
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

    def set_quiet(self, block_ms: int) -> None:
        """The room is quiet (``block_ms`` > 0) or not (0): every source reads blocks, or chunks again."""
        for r in self.runners:
            set_quiet = getattr(r.source, "set_quiet", None)
            if set_quiet is not None:
                set_quiet(block_ms)

    def close(self) -> None:
        for r in self.runners:
            try:
                r.source.close()
            except Exception:  # closing a broken device must not keep the others open
                logger.exception("closing source %s failed", r.name)


class _QuietNotifier(Notifier):
    """Rooms do not talk to systemd; :class:`MultiService` does: a room's READY only marks it started
    (:attr:`ready`) and calls :attr:`on_ready` (the daemon's loop, which says READY once every room is)."""

    def __init__(self) -> None:
        self._n = None
        self.watchdog_s = None
        self.ready = threading.Event()
        self.on_ready: Callable[[], None] | None = None

    def notify(self, msg: str) -> None:
        if msg == "READY=1":
            self.ready.set()
            if self.on_ready is not None:
                self.on_ready()


class RoomPublisher:
    """One room's view of the shared :class:`MqttPublisher`: its own prefix, topics and commands."""

    def __init__(
        self, real: MqttPublisher, room: str, prefix: str, daemon_status_topic: str | None = None
    ) -> None:
        self._real = real
        self.room = room
        self.prefix = prefix
        self.status_topic = f"{prefix}/status"
        self.stats_topic = f"{prefix}/stats"
        self.daemon_status_topic = daemon_status_topic  # several rooms: the connection's will is there
        # the room's hooks; MultiService hands each of the shared client's calls to every room's
        self.on_event_published: Callable[[str], None] | None = None
        self.on_event_acknowledged: Callable[[str], None] | None = None
        self.on_change: Callable[[], None] | None = None

    def __getattr__(self, name: str) -> Any:  # connected, fatal_error, pump, publish_retained, ...
        return getattr(self._real, name)

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
        self.startup = _QuietNotifier()  # .ready: the room's threads run and its registry was read
        self.notifier = self.startup
        self._t0 = time.monotonic()

    def _room_dir(self) -> Path:
        """``<state_dir>/rooms/<room>``: each room's dashboard state and Home Assistant roster file."""
        room_dir = Path(self.settings.state_dir).expanduser() / "rooms" / self.settings.room
        room_dir.mkdir(parents=True, exist_ok=True)
        return room_dir

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
                room_start = r.anchor(chunk, chunk.read_at - self._t0)
                self.plug.audio_arrived(AudioChunk(samples, room_start, read_at=chunk.read_at))
                r.check_flat(samples)
                self._put((r.index, samples, room_start, chunk.read_at))
        finally:
            r.ended = True
            self._put((r.index, None, None, None))

    def _put(self, item: tuple[int, np.ndarray | None, int | None, float | None]) -> None:
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
                health.waiting()
                i, samples, room_start, read_at = self.queue.get()  # no time-out: every reader ends with
                health.beat()  # ... its (i, None, None, None)
                if samples is None:
                    ended += 1
                    outputs = pipeline.end_of(i)
                else:
                    outputs = pipeline.feed_from(i, samples, room_start, read_at)
                self._quiet_reads()
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
            self._wake.set()

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


def daemon_status_topic(settings: Settings) -> str:
    """``<base>/status`` of a daemon of several rooms (``<base>``: ``mqtt.topic_prefix``, else ``cryid``)."""
    return f"{settings.mqtt.topic_prefix.rstrip('/') or 'cryid'}/status"


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
        config_file: Path | None = None,
    ) -> None:
        self.settings = settings
        self.rooms = list(rooms)
        self.publisher = publisher
        self.registry = registry
        self.outbox = outbox
        self.config_file = config_file
        self.notifier = Notifier()
        self.codes: dict[str, int] = {}
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._wake = threading.Event()  # a room ended, the broker (dis)connected, a signal
        # several rooms: the client's status topic is the daemon's own (its last will), the rooms' are ours
        self.room_status = len(self.rooms) > 1
        self.metrics = RoomsMetrics(self.rooms)
        self.server: MetricsServer | None = None
        if settings.metrics.port is not None:
            self.server = MetricsServer(settings.metrics, self.metrics, self.health)  # type: ignore[arg-type]
        publisher.on_event_published = self._published
        publisher.on_event_acknowledged = self._acknowledged
        publisher.on_change = self._changed
        for r in self.rooms:
            r.startup.on_ready = self._wake.set
        self._threads: list[threading.Thread] = []

    @property
    def fatal(self) -> str | None:
        return next((r.fatal for r in self.rooms if r.fatal), None) or self.publisher.fatal_error

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for r in self.rooms:
            r.request_stop()

    def request_reload(self) -> None:
        self._reload.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())

    # the shared client's hooks, handed to every room (paho's thread, or whoever pumps) ----------------
    def _published(self, event_id: str) -> None:
        for r in self.rooms:
            callback = r.publisher.on_event_published
            if callback is not None:
                callback(event_id)

    def _acknowledged(self, event_id: str) -> None:
        for r in self.rooms:
            callback = r.publisher.on_event_acknowledged
            if callback is not None:
                callback(event_id)

    def _changed(self) -> None:
        """The client (dis)connected, failed for good, or freed a slot with events waiting: the daemon's loop
        pumps the shared outbox and wakes the rooms when the connection changed (not at every PUBACK: one
        pump serves every room, 64 rooms' loops woken per PUBACK cost more than their events)."""
        self._wake.set()

    def _tell_rooms(self) -> None:
        for r in self.rooms:
            callback = r.publisher.on_change
            if callback is not None:
                callback()

    def health(self) -> str | None:
        """HTTP thread: None while every room is healthy, else each unhealthy room and why."""
        bad = [f"room {r.settings.room}: {why}" for r in self.rooms if (why := r.plug.health()) is not None]
        return "; ".join(bad) or None

    def room_state(self, i: int) -> str:
        """One room in words for systemd's STATUS: listening, microphone(s) down or silent, failed, ..."""
        r = self.rooms[i]
        if r.fatal:
            return "failed"
        if i < len(self._threads) and not self._threads[i].is_alive():
            return "stopped"
        if not r.startup.ready.is_set():
            return "starting"
        down = [x.name for x in r.runners if x.failure() is not None]
        flat = [x.name for x in r.runners if x.flat.state == "flat" and x.name not in down]
        if len(down) == len(r.runners):
            return "microphone down" if len(down) == 1 else "microphones down"
        parts = [f"microphone {name} down" for name in down] + [f"microphone {name} silent" for name in flat]
        if len(flat) == len(r.runners):
            parts = ["microphone silent" if len(flat) == 1 else "microphones silent"]
        return ", ".join(parts) or "listening"

    def _all_started(self) -> bool:
        """Every room has started (its threads run, its registry was read), or has ended already."""
        rooms = zip(self.rooms, self._threads, strict=True)
        return all(r.startup.ready.is_set() or not t.is_alive() for r, t in rooms)

    def status_line(self) -> str:
        """systemd's STATUS: the broker, every room's state, the outbox (as the single-room daemon's)."""
        rooms = "; ".join(f"{r.settings.room}: {self.room_state(i)}" for i, r in enumerate(self.rooms))
        line = (
            f"{'connected' if self.publisher.connected else 'broker unreachable'}, {len(self.rooms)} rooms; "
            f"{rooms}; outbox {self.outbox.size()}"
        )
        return line + (", DISK FULL" if self.outbox.disk_full else "")

    def _status(self, payload: str) -> None:
        if self.room_status:
            for r in self.rooms:
                self.publisher.publish_retained(r.publisher.status_topic, payload)

    def _do_reload(self) -> None:
        """SIGHUP: read the configuration once, warn once, hand it to every room (registry re-read too)."""
        self._reload.clear()
        logger.info("SIGHUP: reloading configuration and registry")
        new = reload_settings(self.config_file, self.settings) or self.settings
        for r in self.rooms:
            r.request_reload(new)

    def run(self) -> int:
        """Run every room until stopped or every source has ended; the worst room's exit status."""
        self.publisher.start()
        if self.server is not None:
            threading.Thread(target=self.server.serve_forever, name="cryid-metrics", daemon=True).start()
            logger.info("metrics of %d rooms on http://%s/metrics", len(self.rooms), self.server.address)
        threads = self._threads = []
        for r in self.rooms:

            def run_room(room: RoomService = r) -> None:
                try:
                    self.codes[room.settings.room] = room.run()
                except Exception:  # thread boundary: the other rooms go on; the exit status says it
                    logger.exception("room %s failed", room.settings.room)
                    self.codes[room.settings.room] = 1
                finally:
                    self._wake.set()

            threads.append(
                threading.Thread(target=run_room, name=f"cryid-room-{r.settings.room}", daemon=True)
            )
        for t in threads:
            t.start()
        ready = False
        status = ""
        seen = 0
        link: tuple[Any, ...] = ()
        next_dog = next_status = time.monotonic()
        while any(t.is_alive() for t in threads):
            self._wake.clear()
            if not ready and self._all_started():
                ready = True  # every room has started (its threads run, its registry is read)
                self.notifier.notify("READY=1")
            if self._reload.is_set():
                self._do_reload()
            now_link = (self.publisher.connected, self.publisher.connects, self.publisher.fatal_error)
            if now_link != link:
                link = now_link
                self._tell_rooms()
            if self.publisher.connected and self.publisher.connects != seen:
                seen = self.publisher.connects
                self._status(ONLINE)
            self.publisher.pump()
            now = time.monotonic()
            if self.notifier.watchdog_s and now >= next_dog:
                if all(now - r.counters.heartbeat < 10.0 for r in self.rooms):
                    self.notifier.notify("WATCHDOG=1")
                next_dog = now + self.notifier.watchdog_s
            if self.notifier.enabled and ready and now >= next_status:
                line = self.status_line()
                if line != status:
                    status = line
                    self.notifier.notify(f"STATUS={line}")
                next_status = now + STATUS_CHECK_S
            # sleep until a room ends or starts, the broker (dis)connects, a signal, the watchdog is due or
            # (under systemd) the rooms' state is looked at again for STATUS
            dues = [next_dog] if self.notifier.watchdog_s else []
            dues += [next_status] if self.notifier.enabled else []
            self._wake.wait(max(0.0, min(dues) - time.monotonic()) if dues else None)
        self.notifier.notify("STOPPING=1")
        self._status(OFFLINE)
        self.publisher.stop()
        if self.server is not None:
            self.server.close()
        return max(self.codes.values()) if len(self.codes) == len(self.rooms) else 1

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
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
        daemon_status = daemon_status_topic(settings) if several else None
        publisher = MqttPublisher(mqtt, first, outbox, status_topic=daemon_status)
        services = []
        for room in rooms:
            view = RoomPublisher(publisher, room, room_prefix(settings, room, several), daemon_status)
            room_settings = settings.model_copy(update={"room": room, "metrics": MetricsSettings()})
            services.append(  # the daemon's one metrics server (MultiService) serves every room
                RoomService(room_settings, runners[room], embedder, registry, outbox, view, config_file)
            )
            opened.append(services[-1].plug)
            logger.info("room %s: sources %s, topics %s/...", room, services[-1].source.name, view.prefix)  # type: ignore[attr-defined]
        return MultiService(settings, services, publisher, registry, outbox, config_file)
    except BaseException:
        for part in reversed(opened):
            part.close()
        raise
