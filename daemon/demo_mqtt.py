"""The demo's MQTT side: its own broker (embedded amqtt) and the viewer that prints each decision.

:class:`EmbeddedBroker` runs amqtt on localhost, so ``cryid demo`` needs no broker set up;
:class:`Printer` subscribes to the demo's topics, prints every identification as it is published and
keeps the events (de-duplicated by ``event_id``) for the demo's summary of each act.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import socket
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from cryid.daemon.service import ServiceError
from cryid.models.errors import UsageError

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_broker(spec: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``HOST``: port 1883) of ``--broker``."""
    host, _, port = spec.rpartition(":") if ":" in spec else (spec, "", "1883")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"--broker {spec!r}: give HOST:PORT, e.g. 127.0.0.1:1883")
    return host, int(port)


def _broker_class() -> type:
    """amqtt's ``Broker``, but a client that connects gets the retained messages of its own subscriptions
    only: amqtt 0.12 sends each new connection the retained messages matching *every* client's
    subscriptions, so the daemon of the demo's second act got the viewer's ``<prefix>/#`` retained topics
    (status, roster, states) and warned about each."""
    from amqtt.broker import Broker

    class OwnRetained(Broker):  # type: ignore[misc]
        async def _publish_retained_messages_for_subscription(
            self, subscription: tuple[str, int], session: Any
        ) -> None:
            holders = self._subscriptions.get(subscription[0], [])
            if any(held is session for held, _qos in holders):
                await super()._publish_retained_messages_for_subscription(subscription, session)

    return OwnRetained


class EmbeddedBroker:
    """amqtt on localhost in a background asyncio loop (anonymous, QoS 1 works with paho 2)."""

    def __init__(self, port: int, ws_port: int | None = None) -> None:
        self.port = port
        self.ws_port = ws_port  # a websockets listener too, for the dashboard (`cryid demo --dashboard`)
        self._loop = asyncio.new_event_loop()
        listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}}
        if ws_port is not None:
            listeners["ws"] = {"type": "ws", "bind": f"127.0.0.1:{ws_port}"}
        config = {
            "listeners": listeners,
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._broker = _broker_class()(config, loop=self._loop)
        # amqtt warns "Received PUBACK for unknown pending message" when a client acknowledges a message it
        # sent again while the demo shuts down its connections: broker chatter, not the demo's news.
        logging.getLogger("amqtt.mqtt.protocol.handler").setLevel(logging.ERROR)
        self._thread = threading.Thread(target=self._run, name="amqtt", daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._broker.start())
        except BaseException as exc:  # reported to the caller of start()
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()

    def start(self) -> None:
        self._thread.start()
        self._started.wait(10)
        if self._error is not None or not self._started.is_set():
            raise ServiceError(f"could not start the embedded MQTT broker on port {self.port}: {self._error}")

    def stop(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        try:
            fut.result(5)
        except (TimeoutError, concurrent.futures.TimeoutError):
            logger.info("the embedded broker took over 5 s to shut down; stopping its loop")
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)


def _probability(c: dict[str, Any]) -> str:
    """A candidate's probability, or its cosine score when the model has no calibration."""
    return f" cos {c['score']:.2f}" if c.get("probability") is None else f" {c['probability']:.2f}"


# Why an event names no baby (its ``reason``), in a few words; a reason not listed here is printed as sent.
REASON_WORDS = {
    "no_candidates": "no baby enrolled",
    "not_confirmed": "no confirmed cry yet",
    "below_min_confidence": "confidence below min_confidence",
    "below_min_score": "score below min_score",
    "below_min_margin": "margin below min_margin",
}


def describe(ev: dict[str, Any]) -> str:
    """One line for an event: the decision (for an unnamed one, why), its confidence, and the likeliest
    candidates."""
    conf = "-" if ev.get("confidence") is None else f"{ev['confidence']:.2f}"
    cands = ", ".join(f"{c['baby_id']}{_probability(c)}" for c in ev.get("candidates") or [])
    if ev["baby_id"]:
        return f"{ev['baby_id']:<10} named      confidence {conf}  (candidates {cands or '-'})"
    reason = ev.get("reason")
    why = f" ({REASON_WORDS.get(reason, reason)})" if reason else ""
    return f"{'-':<10} not named{why}  confidence {conf}  probably {cands or 'nobody enrolled'}"


class Printer:
    """Subscribes to the demo's topics and prints each identification as it arrives."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        self.events: list[dict[str, Any]] = []  # of the act being replayed (see :meth:`take`)
        self._seen: set[str] = set()  # event ids of every act
        self.prefix = prefix
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._retained: set[str] = set()  # topics that arrived retained with a payload
        self._last_message = time.monotonic()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"cryid-demo-viewer-{os.getpid()}"
        )
        self.client.on_connect = lambda c, *_: c.subscribe(f"{prefix}/#", qos=1)
        self.client.on_subscribe = lambda *_: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise ServiceError(f"the demo could not subscribe at {host}:{port}")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self._last_message = time.monotonic()
            if msg.retain and msg.payload:
                self._retained.add(msg.topic)
        is_event = "/baby/" in msg.topic or msg.topic.endswith("/unknown")
        if msg.retain or msg.topic.endswith("/state") or not is_event:
            return
        ev = json.loads(msg.payload)
        with self._lock:
            if ev["event_id"] in self._seen:
                return  # at-least-once delivery: de-duplicate by event_id
            self._seen.add(ev["event_id"])
            self.events.append(ev)
        tag = "EPISODE   " if ev["kind"] == "episode" else "expiration"
        print(
            f"  {ev['stream_offset_s']:7.2f} s  {tag}  {describe(ev)}  n={ev['n_expirations']}"
            f"  -> {msg.topic}",
            flush=True,
        )

    def _wait_quiet(self, quiet_s: float, limit_s: float) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            with self._lock:
                if time.monotonic() - self._last_message >= quiet_s:
                    return
            time.sleep(0.05)

    def take(self, quiet_s: float = 0.3, limit_s: float = 5.0) -> list[dict[str, Any]]:
        """The events of the act just replayed, once the broker has gone quiet (the daemon's run returns
        when the broker has acknowledged its events; they reach this subscriber a moment later)."""
        self._wait_quiet(quiet_s, limit_s)
        with self._lock:
            events, self.events = self.events, []
        return events

    def clear_retained(self, quiet_s: float = 0.5, limit_s: float = 5.0) -> list[str]:
        """Remove every retained topic the demo left under its prefix (status, roster, baby states) from a
        broker that outlives the demo: subscribe again (the broker resends what it retains), then clear
        each with an empty retained message. Returns the cleared topics."""
        with self._lock:
            self._retained.clear()
            self._last_message = time.monotonic()
        self._ready.clear()
        self.client.subscribe(f"{self.prefix}/#", qos=1)
        self._ready.wait(5)
        self._wait_quiet(quiet_s, limit_s)
        with self._lock:
            topics = sorted(self._retained)
        for topic in topics:
            self.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        return topics

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
