"""Prometheus metrics and a health endpoint over HTTP (``prometheus_client``), off by default.

``GET /metrics``: the registry below in the Prometheus text format. ``GET /healthz``: ``200 ok``
while the source delivers audio and the pipeline thread is alive, else ``503`` with the reason as
the body (for a load balancer, a Kubernetes probe or a monitoring check). The server binds to
``metrics.host`` (127.0.0.1 unless set) on ``metrics.port``; the service runs it in a thread.

Names (all ``cryid_``): counters ``expirations_total``, ``events_total{kind,decision}``,
``mqtt_reconnects_total``, ``source_reopens_total``, ``source_flats_total``; gauges ``outbox_events``,
``mqtt_connected``, ``source_up``, ``source_flat``, ``mic_level_dbfs``, ``babies_enrolled``;
``info{room,model_sha256,version}`` (always 1, for joins on ``instance``); histograms
``publish_latency_seconds{kind}`` (end of the expiration's audio arriving from the source to its
PUBLISH), ``embed_seconds`` (one expiration through the ONNX embedder) and ``stage_seconds{step}``
(each step of an expiration event, from the moment its last sample was heard to the PUBACK).

Several rooms in one daemon (:mod:`cryid.daemon.multi`): :class:`RoomsMetrics` serves every room's
registry with a ``room`` label, and the source figures per source (labels ``room`` and ``source``).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import Field

from cryid.models.errors import SettingsError
from cryid.models.strict import StrictModel

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
EMBED_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class MetricsSettings(StrictModel):
    """Prometheus ``/metrics`` and ``/healthz`` over HTTP."""

    port: int | None = Field(
        None, ge=1, le=65535, description="HTTP port of /metrics and /healthz; unset (default): no server."
    )
    host: str = Field("127.0.0.1", description="Address the metrics server binds to (0.0.0.0: every one).")


class Metrics:
    """The daemon's Prometheus registry; the service calls these at the points where it counts."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.info = Info("cryid", "The daemon: room, model and version (join on instance).", registry=r)
        self.expirations = Counter(
            "cryid_expirations", "Cry expirations embedded and identified.", registry=r
        )
        self.events = Counter(
            "cryid_events", "Cry events stored for publishing.", ["kind", "decision"], registry=r
        )
        self.mqtt_reconnects = Counter(
            "cryid_mqtt_reconnects", "Connections to the broker after the first one.", registry=r
        )
        self.source_reopens = Counter(
            "cryid_source_reopens", "Times the microphone failed and was reopened.", registry=r
        )
        self.source_flats = Counter(
            "cryid_source_flats", "Times the microphone went flat (silence, constant, clipped).", registry=r
        )
        self.outbox_events = Gauge("cryid_outbox_events", "Events waiting for a broker PUBACK.", registry=r)
        self.mqtt_connected = Gauge("cryid_mqtt_connected", "1 while connected to the broker.", registry=r)
        self.source_up = Gauge("cryid_source_up", "1 while the audio source delivers real audio.", registry=r)
        self.source_flat = Gauge(
            "cryid_source_flat", "1 while the microphone delivers a flat line.", registry=r
        )
        self.mic_level = Gauge(
            "cryid_mic_level_dbfs", "RMS input level of the last second, dBFS.", registry=r
        )
        self.babies = Gauge("cryid_babies_enrolled", "Babies enrolled for the model in use.", registry=r)
        self.latency = Histogram(
            "cryid_publish_latency_seconds",
            "From the end of the audio an event is about arriving from the source to its PUBLISH.",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.embed = Histogram(
            "cryid_embed_seconds", "ONNX embedding time of one expiration.", buckets=EMBED_BUCKETS, registry=r
        )
        self.stage = Histogram(
            "cryid_stage_seconds",
            "One step of an expiration event through the daemon (cryid.daemon.stages: heard_to_read, "
            "read_to_detected, ..., end_to_publish, end_to_puback).",
            ["step"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        for kind in ("expiration", "episode"):  # every series exists from the start (rate() needs it)
            for decision in ("identified", "unknown"):
                self.events.labels(kind, decision)
            self.latency.labels(kind)
        self._arrivals: deque[tuple[int, float]] = deque(maxlen=20000)  # (end sample, monotonic time)
        self._waiting: dict[str, tuple[str, float]] = {}  # event id -> (kind, audio arrival time)

    # audio arrival clock (reader thread writes, pipeline thread reads) -------------------------------
    def audio_arrived(self, end_sample: int, at: float) -> None:
        self._arrivals.append((end_sample, at))

    def arrival_time(self, sample: int) -> float | None:
        """Monotonic time the chunk holding ``sample`` came from the source (None: too old / unknown)."""
        for end, at in list(self._arrivals):
            if end >= sample:
                return at
        return None

    # events ------------------------------------------------------------------------------------------
    def event_stored(self, event_id: str, kind: str, decision: str, end_sample: int) -> None:
        self.events.labels(kind, decision).inc()
        at = self.arrival_time(end_sample)
        if at is not None:
            if len(self._waiting) > 10000:  # published long ago or dropped: bound the map
                self._waiting.clear()
            self._waiting[event_id] = (kind, at)

    def event_published(self, event_id: str, now: float) -> None:
        """First PUBLISH of a stored event: observe its latency (events from a previous run have none)."""
        got = self._waiting.pop(event_id, None)
        if got is not None:
            self.latency.labels(got[0]).observe(max(0.0, now - got[1]))

    def text(self) -> bytes:
        return generate_latest(self.registry)


PER_SOURCE = ("cryid_source_up", "cryid_source_flat", "cryid_mic_level_dbfs", "cryid_source_flats",
              "cryid_source_reopens")  # fmt: skip
"""Families reported per source (labels ``room``, ``source``) instead of per room."""


class RoomsMetrics:
    """``/metrics`` of several rooms: every room's registry with a ``room`` label, the source figures per
    source. Collected at each scrape (a custom collector: one family per name, whatever the rooms)."""

    def __init__(self, rooms: Sequence[Any]) -> None:  # cryid.daemon.multi.RoomService
        self.rooms = list(rooms)
        self.registry = CollectorRegistry()
        self.registry.register(self)  # type: ignore[arg-type]

    def collect(self) -> list[Metric]:
        families: dict[str, Metric] = {}
        for r in self.rooms:
            room = r.settings.room
            for fam in r.plug.metrics.registry.collect():
                if fam.name in PER_SOURCE:
                    continue
                out = families.get(fam.name)
                if out is None:
                    out = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for smp in fam.samples:
                    labels = smp.labels if "room" in smp.labels else {"room": room, **smp.labels}
                    out.add_sample(smp.name, labels, smp.value, smp.timestamp, smp.exemplar)
        labels = ["room", "source"]
        up = GaugeMetricFamily("cryid_source_up", "1 while the source delivers real audio.", labels=labels)
        flat = GaugeMetricFamily("cryid_source_flat", "1 while the source is a flat line.", labels=labels)
        level = GaugeMetricFamily(
            "cryid_mic_level_dbfs", "RMS input level of the source's last second, dBFS.", labels=labels
        )
        flats = CounterMetricFamily(
            "cryid_source_flats", "Times the source went flat (silence, constant, clipped).", labels=labels
        )
        reopens = CounterMetricFamily(
            "cryid_source_reopens", "Times the source failed or went flat and was reopened.", labels=labels
        )
        for r in self.rooms:
            for run in r.runners:
                key = [r.settings.room, run.name]
                works = run.failure() is None and not run.ended
                up.add_metric(key, 1.0 if works and run.flat.state != "flat" else 0.0)
                flat.add_metric(key, 1.0 if run.flat.state == "flat" else 0.0)
                db = run.flat.level_dbfs()
                if db is not None:
                    level.add_metric(key, round(db, 1))
                flats.add_metric(key, run.flats)
                reopens.add_metric(key, run.outages)
        return [*families.values(), up, flat, level, flats, reopens]

    def text(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """``/metrics`` and ``/healthz``; ``health()`` returns None when healthy, else the reason."""

    def __init__(self, settings: MetricsSettings, metrics: Metrics, health: Callable[[], str | None]) -> None:
        if settings.port is None:
            raise ValueError("metrics.port is not set")
        self.metrics = metrics
        self.health = health
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, outer.metrics.text(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    reason = outer.health()
                    if reason is None:
                        self._send(200, b"ok\n", "text/plain; charset=utf-8")
                    else:
                        self._send(503, reason.encode() + b"\n", "text/plain; charset=utf-8")
                else:
                    self._send(404, b"not found: try /metrics or /healthz\n", "text/plain; charset=utf-8")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                logger.debug("metrics http: %s", fmt % args)

        try:
            self.httpd = ThreadingHTTPServer((settings.host, settings.port), Handler)
        except OSError as exc:
            raise SettingsError(
                f"metrics.port: cannot listen on {settings.host}:{settings.port} ({exc.strerror}); "
                "choose a free port or stop what uses it"
            ) from exc
        self.httpd.daemon_threads = True
        self.serving = threading.Event()
        self.address = f"{settings.host}:{self.httpd.server_address[1]}"

    def serve_forever(self) -> None:
        """The service runs this in its ``cryid-metrics`` thread."""
        self.serving.set()
        self.httpd.serve_forever(poll_interval=0.2)

    def close(self) -> None:
        """Stop serving and release the port; safe to call twice, or when never served."""
        if self.serving.is_set():
            self.httpd.shutdown()
            self.serving.clear()
        self.httpd.server_close()
