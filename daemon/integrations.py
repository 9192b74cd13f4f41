"""The daemon's links to the hospital's systems: metrics and health, the flat-microphone alarm, the
retained room state topics and Home Assistant discovery. The service calls the hooks below at the
points where it already counts things; each hook is cheap and never raises into the pipeline.

Retained state topics (beside ``<prefix>/status``):

- ``<prefix>/status/source``: ``ok``, ``flat`` (the device delivers digital silence, a constant or a
  clipped flat line for ``source.flat_timeout_s``) or ``down`` (the device failed or the source ended);
- ``<prefix>/status/crying``: ``ON`` from the first provisional event of an episode to its final event.

Both are published on every change and again after every (re)connection to the broker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cryid.daemon.events import CryEvent
from cryid.daemon.flatness import FlatDetector
from cryid.daemon.homeassistant import Discovery, HomeAssistantSettings
from cryid.daemon.logfmt import START_LOGGER
from cryid.daemon.metrics import Metrics, MetricsServer, MetricsSettings
from cryid.daemon.mqtt import MqttPublisher
from cryid.daemon.stages import StageClock, StageStamps

logger = logging.getLogger(__name__)
START = logging.getLogger(START_LOGGER)  # shown at the default level too (cryid.daemon.logfmt)

SourceStatus = Literal["ok", "flat", "down"]
PIPELINE_STALL_S = 10.0  # as the systemd watchdog: a pipeline silent this long is stuck


def _version() -> str:
    try:
        return metadata.version("cryid")
    except metadata.PackageNotFoundError:
        return ""


class Integrations:
    """Owns :class:`Metrics`, the optional :class:`MetricsServer`, a :class:`FlatDetector` and the optional
    Home Assistant :class:`Discovery`; publishes the retained state topics through ``publisher``."""

    def __init__(
        self,
        metrics_settings: MetricsSettings,
        ha_settings: HomeAssistantSettings,
        publisher: MqttPublisher,
        room: str,
        sample_rate: int,
        flat_timeout_s: float,
        stall_s: float,
        episode_gap_s: float,
        state_dir: Path | None,
    ) -> None:
        self.metrics = Metrics()
        self.publisher = publisher
        self.flat = FlatDetector(flat_timeout_s, sample_rate)
        self.stall_s = stall_s
        self.source_topic = f"{publisher.prefix}/status/source"
        self.crying_topic = f"{publisher.prefix}/status/crying"
        self.discovery: Discovery | None = None
        if ha_settings.enabled:
            self.discovery = Discovery(
                ha_settings, room, publisher.prefix, episode_gap_s, state_dir, sw_version=_version(),
                daemon_status_topic=getattr(publisher, "daemon_status_topic", None),
            )  # fmt: skip
        self.server: MetricsServer | None = None
        if metrics_settings.port is not None:
            self.server = MetricsServer(metrics_settings, self.metrics, self.health)
        self.last_audio: float | None = None  # monotonic time of the last chunk from the source
        self.source_ended = False
        self.source_failure: str | None = None  # set by the service when the source is down
        self.pipeline_alive: Callable[[], bool] = lambda: True
        self.pipeline_heartbeat: Callable[[], float] = time.monotonic
        self.flat_state: Literal["ok", "flat"] = "ok"
        self.crying = False
        self._published: dict[str, str] = {}  # retained topic -> payload last published
        self._connects_seen = 0
        self._outages_seen = 0
        self._roster: list[str] | None = None
        self._ha_online = threading.Event()
        self.stages = StageClock(observe=lambda step, s: self.metrics.stage.labels(step).observe(s))
        publisher.on_event_published = self._event_published
        publisher.on_event_acknowledged = self.stages.acked
        if self.discovery is not None:
            publisher.subscribe(self.discovery.ha_status_topic, self._on_ha_status)

    def watch_pipeline(self, alive: Callable[[], bool], heartbeat: Callable[[], float]) -> None:
        self.pipeline_alive, self.pipeline_heartbeat = alive, heartbeat

    def log_start(self, settings: Any, sha: str, source: Any, enrolled: list[str]) -> None:
        """The one line ``cryid run`` prints at the default log level; a warning when nobody is enrolled."""
        self.metrics.info.info({"room": settings.room, "model_sha256": sha, "version": _version()})
        mqtt = settings.mqtt
        extras = [f"metrics on http://{self.server.address}/metrics"] if self.server is not None else []
        extras += ["Home Assistant discovery on"] if self.discovery is not None else []
        START.info(
            "cryid run: room %s, model %s (%s), %d babies enrolled, source %s, broker %s:%d%s%s",
            settings.room,
            Path(settings.model).name,
            sha[:12],
            len(enrolled),
            getattr(source, "name", type(source).__name__),
            mqtt.host,
            mqtt.port,
            " (TLS)" if mqtt.tls else "",
            "".join(f"; {x}" for x in extras),
        )
        if not enrolled:
            logger.warning(
                "no babies enrolled for model %s: every cry is published as unknown; enroll with "
                "`cryid enroll add BABY_ID AUDIO...`",
                sha[:12],
            )

    # reader thread -------------------------------------------------------------------------------
    def audio_arrived(self, chunk: Any) -> None:
        now = time.monotonic()
        self.last_audio = now
        self.metrics.audio_arrived(int(chunk.end_sample), now)

    # pipeline thread -----------------------------------------------------------------------------
    def audio_processed(self, samples: np.ndarray) -> None:
        changed = self.flat.process(samples)
        if changed == "flat":
            logger.warning(
                "microphone flat: %s (a dead or muted device, or a broken cable?); cries cannot be heard "
                "until it delivers sound again",
                self.flat.describe(),
            )
            self.metrics.source_flats.inc()
        elif changed == "ok":
            logger.warning("microphone delivers sound again after a flat line")
        if changed is not None:
            self.flat_state = changed

    def embedded(self, seconds: float) -> None:
        self.metrics.embed.observe(seconds)
        self.metrics.expirations.inc()

    def event_stored(self, ev: CryEvent, end_sample: int, stamps: StageStamps | None = None) -> None:
        self.metrics.event_stored(ev.event_id, ev.kind, ev.decision, end_sample)
        if stamps is not None:
            self.stages.stored(ev.event_id, stamps)
        self.crying = ev.kind == "expiration"

    # whoever pumps the outbox (pipeline or main thread) ---------------------------------------
    def _event_published(self, event_id: str) -> None:
        self.stages.handed(event_id)
        self.metrics.event_published(event_id, time.monotonic())

    # main thread ---------------------------------------------------------------------------------
    def source_status(self) -> SourceStatus:
        if self.source_failure is not None or self.source_ended:
            return "down"
        return "flat" if self.flat_state == "flat" else "ok"

    def tick(self, enrolled: list[str], outbox_size: int, outages: int) -> None:
        """Gauges, the retained state topics, Home Assistant discovery; called by the main loop."""
        m = self.metrics
        connected = self.publisher.connected
        m.mqtt_connected.set(1 if connected else 0)
        m.outbox_events.set(outbox_size)
        m.babies.set(len(enrolled))
        status = self.source_status()
        m.source_up.set(1 if status == "ok" else 0)
        m.source_flat.set(1 if status == "flat" else 0)
        level = self.flat.level_dbfs()
        if level is not None:
            m.mic_level.set(round(level, 1))
        if outages > self._outages_seen:  # every outage of a MicSource is followed by reopening it
            m.source_reopens.inc(outages - self._outages_seen)
            self._outages_seen = outages
        connects = self.publisher.connects
        if connects > self._connects_seen:
            m.mqtt_reconnects.inc(max(0, connects - 1) - max(0, self._connects_seen - 1))
            self._connects_seen = connects
            self._published.clear()  # a new session: publish the state again (the broker may be new)
            self._roster = None
        if not connected:
            return
        self._retain(self.source_topic, status)
        self._retain(self.crying_topic, "ON" if self.crying else "OFF")
        if self.discovery is not None:
            roster = sorted(enrolled)
            if self._ha_online.is_set() or roster != self._roster:
                self._ha_online.clear()
                for topic, payload, _retain in self.discovery.messages(roster):
                    self.publisher.publish_retained(topic, payload)
                self._roster = roster

    def _retain(self, topic: str, payload: str) -> None:
        if self._published.get(topic) == payload:
            return
        if self.publisher.publish_retained(topic, payload):
            self._published[topic] = payload
            if topic == self.source_topic:
                logger.info("source status: %s", payload)

    def _on_ha_status(self, topic: str, payload: bytes) -> None:  # paho's thread
        if self.discovery is not None and self.discovery.is_ha_online(topic, payload):
            logger.info("Home Assistant is online: republishing the discovery configs")
            self._ha_online.set()

    # health (HTTP thread) ------------------------------------------------------------------------
    def health(self) -> str | None:
        """None while healthy, else why not (the body of a 503)."""
        now = time.monotonic()
        if not self.pipeline_alive():
            return "pipeline thread is not running"
        idle = now - self.pipeline_heartbeat()
        if idle > PIPELINE_STALL_S:
            return f"pipeline stalled: no progress for {idle:.0f} s"
        if self.source_failure is not None:
            return f"audio source down: {self.source_failure}"
        if self.source_ended:
            return "audio source ended"
        if self.last_audio is None:
            return "no audio from the source yet"
        quiet = now - self.last_audio
        if quiet > self.stall_s:
            return f"no audio from the source for {quiet:.0f} s"
        if self.flat_state == "flat":
            return f"microphone flat: {self.flat.describe()}"
        return None

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
