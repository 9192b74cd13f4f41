"""The daemon's lifecycle: the only place with threads, queues and signals.

Threads: a reader (``source.read()`` -> bounded queue), the pipeline (the thread-free
:class:`~cryid.daemon.live.LivePipeline`, segmenter -> embedder -> identifier, then outbox -> MQTT pump)
and the main thread (signals, registry polling, stats, systemd notify, outbox retries, shutdown). paho
runs its own network thread (:mod:`cryid.daemon.mqtt`). The main thread hands new references and
identifier settings to the pipeline with ``LivePipeline.apply`` (a queue it drains before each chunk),
and reads its counters with one locked ``PipelineHealth.snapshot_and_reset``.

Nothing polls: the pipeline blocks on its queue, and the main thread sleeps on one event until
something happens (an event stored, a PUBACK with more events waiting, the broker (dis)connecting, a
nurse's command, a signal, the pipeline ending) or the next periodic duty is due (the registry check,
a cheap ``PRAGMA data_version`` on the kept connection every ``service.registry_poll_s``; stats; the
watchdog). Once the segmenter's gate has been shut for ``QUIET_AFTER_S``, the source reads
``source.quiet_chunk_ms`` blocks (fewer wake-ups in a quiet room); the first frame that opens the gate
switches back to ``source.chunk_ms`` chunks and cuts the block being read short. Every expiration event
is stamped at each stage (:mod:`cryid.daemon.stages`); the stats carry p50/p95 per step.

Stopping (SIGTERM/SIGINT, or the end of a file): the reader stops, the pipeline drains the queue and
flushes the segmenter (the expiration being heard is finished) and the identifier (the episode gets
its final event), the outbox is given ``service.shutdown_timeout_s`` to be acknowledged (whatever is
left is published at the next start), ``offline`` is published, exit 0. SIGHUP re-reads the config
(identifier thresholds and gaps; other sections need a restart) and the registry. A broker refusing
the credentials is fatal.

The ward teaches the model (:class:`cryid.daemon.ward.Ward`): the pipeline hands every final episode
(its expiration embeddings) to the main thread, which keeps it in the registry and purges expired ones
at start and every ``registry.episode_purge_interval_s``. Nurses' MQTT commands arrive from paho's
thread on a bounded queue; the main thread applies them, answers on ``<prefix>/cmd/result`` and
reloads the references at once. The references are each baby's birth centroid and, once confirmed
cries exist, their centroid as a separate reference (:class:`~cryid.models.scoring.ReferenceSet`,
weighted by the model's ``calibration.confirmed_weight``). The dashboard's retained room state
(:class:`cryid.daemon.roomfeed.RoomFeed`) is fed every published event the same way, and at every
registry change (a nurse's answer over MQTT or from ``cryid enroll confirm|reject|undo`` in another
process, seen through ``data_version``) and at start the cries still waiting for a nurse from the kept
episodes.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cryid.daemon.config import Settings, load_settings
from cryid.daemon.events import Stats
from cryid.daemon.feedback import COMMAND_VERBS
from cryid.daemon.integrations import Integrations
from cryid.daemon.live import EmbedderLike, LivePipeline, NewIdentifierSettings, NewReferences, Output
from cryid.daemon.mqtt import MqttPublisher
from cryid.daemon.outbox import Outbox
from cryid.daemon.roomfeed import RoomFeed
from cryid.daemon.ward import Ward
from cryid.models.audio import SAMPLE_RATE
from cryid.models.errors import CryidError
from cryid.models.scoring import ReferenceSet

logger = logging.getLogger(__name__)

_EOF = object()
QUIET_AFTER_S = 1.0  # the gate shut this long: the room is quiet (larger reads, see source.quiet_chunk_ms)


class ServiceError(CryidError):
    """A fatal condition the daemon cannot recover from (bad credentials, no model, ...)."""


class Source(Protocol):
    """What the service needs of an audio source (``cryid.daemon.sources.AudioSource``)."""

    @property
    def eof(self) -> bool: ...

    def open(self) -> None: ...

    def read(self, timeout_s: float | None = None) -> Any: ...  # AudioChunk, or None (nothing yet / eof)

    def close(self) -> None: ...


class RegistryLike(Protocol):
    def centroids(
        self, model_sha256: str, room: str | None = None, dim: int | None = None
    ) -> dict[str, np.ndarray]: ...

    def needs_reenrollment(self, model_sha256: str, room: str | None = None) -> list[str]: ...

    def data_version(self) -> int: ...

    def references(
        self, model_sha256: str, room: str | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]: ...

    def infants(self) -> list[Any]: ...

    def waiting_episodes(self, room: str, since: datetime, limit: int) -> list[Any]: ...

    def answered_episodes(self, room: str, since: datetime) -> set[str]: ...


class Notifier:
    """systemd notify (READY, WATCHDOG, STATUS) when ``NOTIFY_SOCKET`` is set; otherwise nothing."""

    def __init__(self) -> None:
        self._n: Any = None
        self.watchdog_s: float | None = None
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify

            self._n = sdnotify.SystemdNotifier()
            usec = os.environ.get("WATCHDOG_USEC")
            if usec and usec.isdigit():
                self.watchdog_s = int(usec) / 1e6 / 2

    @property
    def enabled(self) -> bool:
        """True under systemd (``NOTIFY_SOCKET`` set)."""
        return self._n is not None

    def notify(self, msg: str) -> None:
        if self._n is not None:
            self._n.notify(msg)


class Service:
    """source -> segmenter -> embedder -> identifier -> outbox -> MQTT, until stopped or the source ends."""

    def __init__(
        self,
        settings: Settings,
        source: Source,
        embedder: EmbedderLike,
        registry: RegistryLike,
        outbox: Outbox,
        publisher: MqttPublisher,
        config_file: Path | None = None,
    ) -> None:
        self.settings = settings
        self.source = source
        self.embedder = embedder
        self.registry = registry
        self.outbox = outbox
        self.publisher = publisher
        self.config_file = config_file
        self.sha = embedder.sha256
        calibration = getattr(getattr(embedder, "manifest", None), "calibration", None)
        if calibration is None:
            logger.warning(
                "model %s has no calibration: babies are named on cosine thresholds (identifier.min_score/"
                "min_margin, else fallback_min_score %s/fallback_min_margin %s) and events carry no "
                "confidence; fix: `cryid model calibrate %s --data DIR`",
                settings.model, settings.identifier.fallback_min_score,
                settings.identifier.fallback_min_margin, settings.model,
            )  # fmt: skip
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=settings.service.queue_chunks)
        self.stream_start = datetime.now(timezone.utc)
        self.started = time.monotonic()
        self.notifier = Notifier()
        self.source_error: str | None = None
        self.fatal: str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # wakes the main loop: an event stored, a PUBACK, a signal, ...
        self._reload = threading.Event()
        self._reloaded: Settings | None = None  # read by whoever called request_reload (several rooms)
        self._pipeline_done = threading.Event()
        self._registry_version: int | None = None
        self._enrolled: list[str] = []
        self._needs_reenrollment: list[str] = []
        self._source_state: Any = None
        self._quiet = False  # the source reads quiet blocks (pipeline thread)
        self.ward = Ward(registry, settings.registry, settings.room, publisher.publish_result, self._wake.set)
        publisher.set_command_sink(COMMAND_VERBS, self.ward.command)
        publisher.on_change = self._wake.set  # (dis)connected, fatal, or a PUBACK with more events waiting
        # retained dashboard state: fed by the pipeline thread through a queue, kept by the main thread
        state_dir = self._room_dir()
        self.dashboard = RoomFeed(publisher, settings.room, settings.dashboard.crying_timeout_s, state_dir)
        self.plug = Integrations(  # metrics and /healthz, flat mic, retained state, Home Assistant
            settings.metrics, settings.homeassistant, publisher, settings.room, SAMPLE_RATE,
            settings.source.flat_timeout_s, max(settings.source.stall_timeout_s, 2.0),
            settings.identifier.episode_gap_s, state_dir,
        )  # fmt: skip
        self.pipeline = LivePipeline(  # the references arrive with the first registry poll
            embedder, settings.segmenter, settings.identifier, room=settings.room, calibration=calibration,
            observer=self.plug,
        )  # fmt: skip
        self.counters = self.pipeline.health  # written by the pipeline thread, read by the main thread

    # control (any thread, signal handlers) -----------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def request_reload(self, settings: Settings | None = None) -> None:
        """Re-read the configuration (SIGHUP); ``settings``: already read (and checked) by the caller."""
        self._reloaded = settings
        self._reload.set()
        self._wake.set()

    def _room_dir(self) -> Path:
        """Where the room's own state lives (dashboard state, Home Assistant's roster file)."""
        return Path(self.settings.state_dir).expanduser()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop, SIGHUP reloads (only possible from the main thread)."""
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())

    # threads ------------------------------------------------------------------------------------
    def _reader(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = self.source.read(0.5)
                if chunk is None:
                    if self.source.eof:
                        self.plug.source_ended = True
                        break
                    continue
                self.plug.audio_arrived(chunk)
                while not self._stop.is_set():
                    try:
                        self.queue.put(chunk, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except Exception as exc:  # thread boundary: a source that fails for good ends the run
            logger.exception("audio source failed")
            self.source_error = str(exc)
            self.fatal = f"audio source failed: {exc}"
        finally:
            self.queue.put(_EOF)

    def _pipeline(self) -> None:
        health = self.counters
        try:
            while True:
                health.waiting()
                item = self.queue.get()  # no time-out: the reader always ends with _EOF
                health.beat()
                if item is _EOF:
                    break
                outputs = self.pipeline.feed(item.samples, getattr(item, "read_at", None))
                self._quiet_reads()
                t0 = time.perf_counter()
                for out in outputs:
                    self._emit(out)
                health.add_busy(time.perf_counter() - t0)
            for out in self.pipeline.flush():
                self._emit(out)
        except Exception as exc:  # thread boundary
            logger.exception("pipeline failed")
            self.fatal = f"pipeline failed: {exc}"
        finally:
            self._pipeline_done.set()
            self._wake.set()

    def _quiet_reads(self) -> None:
        """Pipeline thread: a room quiet for ``QUIET_AFTER_S`` is read in ``source.quiet_chunk_ms`` blocks
        (fewer wake-ups); the first frame that opens the gate switches back at once."""
        quiet = self.pipeline.gate_shut_s >= QUIET_AFTER_S
        if quiet != self._quiet:
            self._quiet = quiet
            set_quiet = getattr(self.source, "set_quiet", None)
            if set_quiet is not None:
                set_quiet(self.settings.source.quiet_chunk_ms if quiet else 0)

    def _emit(self, out: Output) -> None:
        r, ev = out.identification, out.event
        topic = self.publisher.event_topic(ev.baby_id)
        self.outbox.add(ev.event_id, ev.kind, topic, ev.to_json())
        self.plug.event_stored(ev, r.end_sample, out.stamps)
        self.publisher.pump()  # publish before anything else: the rest is not on the path to the ward
        self.dashboard.observe(ev)
        self._wake.set()  # the main thread fsyncs the outbox and feeds the dashboard
        if r.kind == "episode":
            self.ward.keep(r, ev)  # the main thread keeps it in the registry
        logger.info(
            "event %s %s at %.2f s: %s baby=%s score=%s margin=%s n=%d",
            ev.event_id,
            ev.kind,
            ev.stream_offset_s,
            ev.decision,
            ev.best_baby_id,
            ev.score,
            ev.margin,
            ev.n_expirations,
        )

    # main thread ----------------------------------------------------------------------------
    def _poll_registry(self) -> None:
        reopen = getattr(self.registry, "reopen_if_replaced", None)  # the file deleted or replaced
        if reopen is not None and reopen():
            self._registry_version = None
        version = self.registry.data_version()
        if version == self._registry_version:
            return
        self._registry_version = version
        birth, confirmed = self.registry.references(  # only the room's babies, usable vectors only
            self.sha, self.settings.room, getattr(self.embedder, "dim", None)
        )
        refs = ReferenceSet(birth, confirmed, self.pipeline.confirmed_weight)
        cents = birth
        added = sorted(set(cents) - set(self._enrolled))
        removed = sorted(set(self._enrolled) - set(cents))
        self._enrolled = sorted(cents)
        self._needs_reenrollment = self.registry.needs_reenrollment(self.sha, room=self.settings.room)
        self.pipeline.apply(NewReferences(refs))  # taken before the pipeline's next chunk
        self.dashboard.roster(self.registry.infants())
        self.dashboard.waiting(self.registry)  # answers from anywhere; at start, the cries still waiting
        logger.info(
            "registry: %d %s enrolled in room %s for model %s (added %s, removed %s), "
            "%d with confirmed cries",
            len(cents),
            "baby" if len(cents) == 1 else "babies",
            self.settings.room,
            self.sha[:12],
            ", ".join(added) or "-",
            ", ".join(removed) or "-",
            len(confirmed),
        )
        if self._needs_reenrollment:
            logger.warning(
                "%d babies have no embeddings for the current model and cannot be identified: %s; "
                "run `cryid enroll reembed`",
                len(self._needs_reenrollment),
                ", ".join(self._needs_reenrollment),
            )

    def _serve_ward(self, now: float) -> None:
        """Main thread: keep the pipeline's episodes, apply nurses' commands, purge expired episodes."""
        if self.ward.serve():
            self._poll_registry()  # the confirmation counts from the next chunk, not the next poll
        self.ward.purge_if_due(now)

    def _do_reload(self) -> None:
        self._reload.clear()
        new, self._reloaded = self._reloaded, None
        if new is None:
            logger.info("SIGHUP: reloading configuration and registry")
            new = reload_settings(self.config_file, self.settings)
        if new is not None:
            self.pipeline.apply(NewIdentifierSettings(new.identifier))
            self.settings = self.settings.model_copy(
                update={"identifier": new.identifier, "room": self.settings.room}
            )
        self._registry_version = None
        self._poll_registry()

    def stats(self) -> Stats:
        c = self.counters.snapshot_and_reset()  # totals and this interval's figures at one instant
        rtf, level = c.realtime_factor, c.level_dbfs
        return Stats(
            at=datetime.now(timezone.utc),
            room=self.settings.room,
            uptime_s=round(time.monotonic() - self.started, 1),
            stream_offset_s=round(c.samples / SAMPLE_RATE, 2),
            realtime_factor=None if rtf is None else round(rtf, 4),
            queue_depth=self.queue.qsize(),
            dropped_frames=int(getattr(self.source, "dropped_chunks", 0))
            + int(getattr(self.source, "overflows", 0)),
            outbox_size=self.outbox.size(),
            outbox_dropped=self.outbox.dropped,
            input_level_dbfs=None if level is None else round(max(level, -120.0), 1),
            source_ok=self.source_error is None and not c.nonfinite,
            source_error=self.source_error
            or ("the audio source delivers NaN or infinite samples" if c.nonfinite else None),
            expirations=c.expirations,
            episodes=c.episodes,
            enrolled=len(self._enrolled),
            needs_reenrollment=self._needs_reenrollment,
            model_sha256=self.sha,
            nonfinite_samples=c.nonfinite_samples,
            disk_full=self.outbox.disk_full,
            memory_events=self.outbox.memory_size,
            publish_refused=self.publisher.refused,
            broker_error=self.publisher.last_error,
            stages=self.plug.stages.summary(),
        )

    def run(self) -> int:
        """Run until stopped (signal) or the source ends; returns the exit status."""
        self._poll_registry()
        left = self.outbox.size()
        if left:
            logger.info("%d events from a previous run wait in the outbox; publishing them first", left)
        self.plug.log_start(self.settings, self.sha, self.source, self._enrolled)
        self.publisher.start()
        self.stream_start = self.pipeline.stream_start = datetime.now(timezone.utc)
        threads = [
            threading.Thread(target=self._reader, name="cryid-reader", daemon=True),
            threading.Thread(target=self._pipeline, name="cryid-pipeline", daemon=True),
        ]
        for t in threads:
            t.start()
        self.plug.watch_pipeline(threads[1].is_alive, lambda: self.counters.heartbeat)
        if self.plug.server is not None:
            threading.Thread(target=self.plug.server.serve_forever, name="cryid-metrics", daemon=True).start()
        self.notifier.notify("READY=1")
        poll_s = self.settings.service.registry_poll_s
        next_poll = next_stats = next_dog = time.monotonic()
        next_stats += min(5.0, self.settings.mqtt.stats_interval_s)
        while not self._pipeline_done.is_set():
            if self.publisher.fatal_error:
                self.fatal = self.publisher.fatal_error
            if self.fatal:
                break
            now = time.monotonic()
            if self._reload.is_set():
                self._do_reload()
            if now >= next_poll:
                self._poll_registry()
                next_poll = now + poll_s
            if self._check_source_state() or now >= next_stats:
                st = self.stats()
                self.publisher.publish_stats(st.model_dump_json())
                self.notifier.notify(
                    f"STATUS={'connected' if self.publisher.connected else 'broker unreachable'}, "
                    f"{st.enrolled} babies, {st.expirations} expirations, outbox {st.outbox_size}"
                    + (", DISK FULL" if st.disk_full else "")
                )
                next_stats = now + self.settings.mqtt.stats_interval_s
            if self.notifier.watchdog_s and now >= next_dog:
                if now - self.counters.heartbeat < 10.0:  # only while the pipeline is alive
                    self.notifier.notify("WATCHDOG=1")
                next_dog = now + self.notifier.watchdog_s
            self._serve_ward(now)
            self.plug.tick(self._enrolled, self.outbox.size(), getattr(self._source_state, "outages", 0))
            self._wake.clear()  # before the pump: an event stored during it wakes the next wait
            self.outbox.sync()  # fsync the events stored since the last wake (being published meanwhile)
            self.outbox.retry()  # a full disk: store the events held in memory once there is room
            self.publisher.pump()
            self.dashboard.update(now)
            # sleep until something happens (an event stored, a PUBACK, a command, a signal, the broker
            # (dis)connecting, the pipeline ending) or the next periodic duty: no polling in between
            due = min(next_poll, next_stats, next_dog if self.notifier.watchdog_s else next_poll)
            self._wake.wait(max(0.0, due - time.monotonic()))
            if self._stop.is_set():
                logger.info("stopping: finishing the current expiration")
                self._stop_source()
                break
        return self._shutdown(threads)

    def _check_source_state(self) -> bool:
        """A live source went down or came back (``state`` of a MicSource): True when it changed."""
        state = getattr(self.source, "state", None)
        if state is None or state == self._source_state:
            return False
        self._source_state = state
        self.source_error = None if state.ok else state.message
        self.plug.source_failure = self.source_error
        return True

    def _stop_source(self) -> None:
        self._stop.set()
        try:
            self.source.close()
        except Exception:  # closing a broken device must not prevent a clean stop
            logger.exception("closing the audio source failed")

    def _shutdown(self, threads: list[threading.Thread]) -> int:
        self.notifier.notify("STOPPING=1")
        if self.fatal:
            self._stop_source()
        for t in threads:
            t.join(timeout=max(5.0, self.settings.service.shutdown_timeout_s))
        self._serve_ward(time.monotonic())  # the last episodes (and any command) before going offline
        self.outbox.sync()  # the pipeline's last events
        deadline = time.monotonic() + self.settings.service.shutdown_timeout_s
        while (
            (self.outbox.size() or not self.publisher.ever_connected)
            and time.monotonic() < deadline
            and not self.publisher.fatal_error
        ):
            self.publisher.pump()
            time.sleep(0.05)
        self.fatal = self.fatal or self.publisher.fatal_error
        if self.outbox.size():
            logger.warning(
                "%d events not acknowledged yet; they are published at the next start%s",
                self.outbox.size(),
                f" (last broker problem: {self.publisher.last_error})" if self.publisher.last_error else "",
            )
        self.publisher.publish_stats(self.stats().model_dump_json())
        self.dashboard.stop(time.monotonic())
        self.publisher.stop()
        self.plug.close()
        if self.fatal:
            logger.error("%s", self.fatal)
            return 1
        logger.info("stopped")
        return 0

    def close(self) -> None:
        """Release the outbox lock, the registry and the source."""
        self.plug.close()  # the metrics port, also when run() never ran
        for part in (self.source, self.registry, self.outbox):
            close = getattr(part, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # closing must release the rest even if one part is broken
                    logger.exception("closing %s failed", type(part).__name__)


RESTART_SECTIONS = (
    "state_dir", "model", "segmenter", "embedder", "registry", "mqtt", "outbox", "room", "source", "sources",
    "service", "metrics", "homeassistant", "dashboard",
)  # fmt: skip
"""Settings a SIGHUP cannot change in a running daemon (only ``identifier`` can)."""


def reload_settings(config_file: Path | None, running: Settings) -> Settings | None:
    """The configuration read again for SIGHUP (None: unreadable, the running one stays); warns once about
    changes that need a restart."""
    try:
        new = load_settings(config_file)
    except Exception as exc:  # a bad edit must not kill a running daemon
        logger.error("configuration not reloaded, keeping the running one: %s", exc)
        return None
    restart = [name for name in RESTART_SECTIONS if getattr(new, name) != getattr(running, name)]
    if restart:
        logger.warning("changes to %s take effect after a restart", ", ".join(restart))
    return new


def load_embedder(settings: Settings) -> Any:
    """The ONNX embedder of ``settings.model``; a missing model is a one-line error naming the fix."""
    from cryid.models.embedder import Embedder

    model_dir = Path(settings.model).expanduser()
    if not (model_dir / "model.onnx").is_file():
        raise ServiceError(
            f"no model at {model_dir} (model.onnx missing); set CRYID_MODEL to a model directory "
            "made by `cryid model export`"
        )
    return Embedder(model_dir, settings.embedder)


def build_service(
    settings: Settings, source_spec: str, realtime: bool = False, config_file: Path | None = None
) -> Service:
    """Open the real parts: the source (``mic``, ``-`` or a file), model, registry, outbox, broker client."""
    from cryid.daemon.sources import make_source
    from cryid.enrollment.registry import Registry

    source = make_source(source_spec, settings.source, realtime=realtime)
    opened: list[Any] = [source]
    try:
        source.open()  # an unreadable file or a wrong device name fails here, before the model loads
        embedder = load_embedder(settings)
        registry = Registry.open(Path(settings.state_dir).expanduser(), settings.registry)
        opened.append(registry)
        outbox = Outbox.open(settings.state_dir, settings.outbox)
        opened.append(outbox)
        publisher = MqttPublisher(settings.mqtt, settings.room, outbox)
    except BaseException:
        for part in reversed(opened):
            part.close()
        raise
    return Service(settings, source, embedder, registry, outbox, publisher, config_file)
