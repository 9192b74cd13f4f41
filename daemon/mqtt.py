"""MQTT publisher (paho-mqtt 2, callback API v2): availability, outbox events at QoS 1, stats.

The connection runs in paho's network thread (``loop_start``) and reconnects with a capped
exponential back-off, also when the broker is down at start (``connect_async``). Events are never
published straight from the pipeline: they are stored in the :class:`~cryid.daemon.outbox.Outbox`
first, :meth:`MqttPublisher.pump` publishes the oldest waiting ones while connected (at most
``max_inflight`` unacknowledged), and the PUBACK (``on_publish``) deletes them from the outbox. paho
re-sends its unacknowledged messages after a reconnect with the same message ids; after a restart
every stored event is published again. A broker refusing the credentials is fatal
(:attr:`MqttPublisher.fatal_error`): retrying never helps.

Nurses' commands: after :meth:`MqttPublisher.set_command_sink` the client subscribes (QoS 1, again at
every connect) to ``<prefix>/cmd/<verb>`` and hands each message to the sink from paho's thread; the
service answers with :meth:`MqttPublisher.publish_result` on ``<prefix>/cmd/result``.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from cryid.daemon.config import MqttSettings
from cryid.daemon.outbox import Outbox
from cryid.models.errors import SettingsError

logger = logging.getLogger(__name__)

ONLINE = "online"
OFFLINE = "offline"

# CONNACK refusals that retrying cannot fix (MQTT 3.1.1 codes 4 and 5, and their MQTT 5 names).
_AUTH_REFUSALS = {"Bad user name or password", "Not authorized", "Bad username or password"}
_CONFIG_REFUSALS = {"Unsupported protocol version", "Client identifier not valid"}


class MqttPublisher:
    """Publishes the outbox, availability and stats to one broker."""

    def __init__(self, settings: MqttSettings, room: str, outbox: Outbox) -> None:
        self.settings = settings
        self.room = room
        self.prefix = settings.prefix(room)
        self.outbox = outbox
        self.status_topic = f"{self.prefix}/status"
        self.stats_topic = f"{self.prefix}/stats"
        self.fatal_error: str | None = None
        self.ever_connected = False
        self.published = 0
        self.acknowledged = 0
        self._map_lock = threading.Lock()  # mid -> event id; never held while calling into paho
        self._pump_lock = threading.Lock()  # one pump at a time, so no event is published twice
        self._inflight: dict[int, str | None] = {}
        self._early: set[int] = set()
        self._connected = threading.Event()
        self.connected_changed = threading.Event()
        self._command_topics: dict[str, str] = {}  # topic -> verb
        self._command_sink: Callable[[str, bytes], None] | None = None
        self._client = self._build_client()
        self._started = False
        self._stopping = False

    # topics ---------------------------------------------------------------------------------
    def event_topic(self, baby_id: str | None) -> str:
        """``<prefix>/baby/<baby_id>``, or ``<prefix>/unknown`` when nobody was identified."""
        return f"{self.prefix}/baby/{baby_id}" if baby_id else f"{self.prefix}/unknown"

    def command_topic(self, verb: str) -> str:
        """``<prefix>/cmd/<verb>``: ``confirm``, ``reject``, ``undo`` (from nurses), ``result`` (answers)."""
        return f"{self.prefix}/cmd/{verb}"

    # nurses' commands -------------------------------------------------------------------------
    def set_command_sink(self, verbs: Sequence[str], sink: Callable[[str, bytes], None]) -> None:
        """Subscribe to ``<prefix>/cmd/<verb>`` for each verb (call before :meth:`start`); ``sink(verb,
        payload)`` runs in paho's network thread, so it must only hand the command over."""
        self._command_topics = {self.command_topic(v): v for v in verbs}
        self._command_sink = sink

    def publish_result(self, payload: str) -> bool:
        """An answer on ``<prefix>/cmd/result`` (QoS 1, not retained, not kept in the outbox)."""
        return self._publish(self.command_topic("result"), payload, 1, False, None)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        verb = self._command_topics.get(msg.topic)
        if verb is None or self._command_sink is None:
            logger.warning("message on unexpected topic %s ignored", msg.topic)
            return
        self._command_sink(verb, bytes(msg.payload))

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            logger.error("broker refused the command subscriptions (%s); check the ACL", ", ".join(refused))

    # lifecycle --------------------------------------------------------------------------------
    def _build_client(self) -> mqtt.Client:
        s = self.settings
        client_id = s.client_id or f"cryid-{self.room}"
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        client.enable_logger(logging.getLogger(__name__ + ".paho"))
        client.max_inflight_messages_set(s.max_inflight)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(
            min_delay=max(1, round(s.reconnect_min_s)), max_delay=max(1, round(s.reconnect_max_s))
        )
        if s.username is not None:
            client.username_pw_set(s.username, s.resolved_password())
        if s.tls:
            ca = str(s.ca_file.expanduser()) if s.ca_file is not None else None
            if ca is not None and not s.ca_file.expanduser().is_file():  # type: ignore[union-attr]
                raise SettingsError(f"mqtt.ca_file: {ca} does not exist; give the broker's CA certificate")
            client.tls_set(ca_certs=ca, cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.will_set(self.status_topic, OFFLINE, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def start(self) -> None:
        """Connect in the background (retrying with back-off until the broker is there)."""
        s = self.settings
        logger.info("connecting to MQTT broker %s:%d (prefix %s)", s.host, s.port, self.prefix)
        self._client.connect_async(s.host, s.port, keepalive=s.keepalive_s)
        self._client.loop_start()
        self._started = True

    def stop(self, timeout_s: float = 2.0) -> None:
        """Publish ``offline`` (retained), disconnect and stop the network thread."""
        if not self._started:
            return
        self._stopping = True
        if self._connected.is_set():
            info = self._client.publish(self.status_topic, OFFLINE, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=timeout_s)
            except (RuntimeError, ValueError) as exc:
                logger.warning("could not publish offline status: %s", exc)
        self._client.disconnect()
        self._client.loop_stop()
        self._started = False

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    # callbacks (paho's network thread) -------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        if reason.is_failure:
            name = str(reason)
            if name in _AUTH_REFUSALS:
                self.fatal_error = (
                    f"broker {self.settings.host}:{self.settings.port} refused the connection: "
                    f"bad username or password ({name}); fix mqtt.username / mqtt.password(_file)"
                )
            elif name in _CONFIG_REFUSALS:
                self.fatal_error = f"broker {self.settings.host}:{self.settings.port} refused: {name}"
            if self.fatal_error:
                logger.error("%s", self.fatal_error)
                client.disconnect()  # stops paho's retry loop
            else:
                logger.warning("broker refused the connection (%s); retrying", name)
            return
        logger.info("connected to MQTT broker %s:%d", self.settings.host, self.settings.port)
        self._publish(self.status_topic, ONLINE, 1, True, None)
        if self._command_topics:  # clean session: subscribe again at every connect
            client.subscribe([(t, 1) for t in self._command_topics])
        self.ever_connected = True
        self._connected.set()
        self.connected_changed.set()

    def _on_disconnect(self, client: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self.connected_changed.set()
        if was and not self._stopping:
            logger.warning(
                "disconnected from MQTT broker (%s); %d events wait in the outbox; reconnecting",
                reason,
                self.outbox.size(),
            )

    def _on_publish(self, client: mqtt.Client, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        with self._map_lock:
            if mid not in self._inflight:
                self._early.add(mid)  # PUBACK before publish() returned its mid
                return
            event_id = self._inflight.pop(mid)
        self._acknowledged(event_id)

    def _acknowledged(self, event_id: str | None) -> None:
        if event_id is None:
            return
        self.acknowledged += 1
        self.outbox.remove(event_id)

    # publishing -------------------------------------------------------------------------------
    def _publish(self, topic: str, payload: str, qos: int, retain: bool, event_id: str | None) -> bool:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            # MQTT_ERR_NO_CONN still queues the message in paho; it goes out after the reconnect.
            logger.warning("publish to %s failed: %s", topic, mqtt.error_string(info.rc))
            return False
        if qos == 0:
            return True
        with self._map_lock:
            if info.mid in self._early:
                self._early.discard(info.mid)
                early = True
            else:
                self._inflight[info.mid] = event_id
                early = False
        if early:
            self._acknowledged(event_id)
        return True

    def inflight_ids(self) -> set[str]:
        with self._map_lock:
            return {e for e in self._inflight.values() if e is not None}

    def pump(self) -> int:
        """Publish the oldest stored events that are not in flight yet (while connected); returns how many."""
        if not self._connected.is_set() or self.fatal_error:
            return 0
        sent = 0
        with self._pump_lock:
            inflight = self.inflight_ids()
            room = self.settings.max_inflight - len(inflight)
            for item in self.outbox.pending(limit=room, exclude=inflight):
                if not self._connected.is_set():
                    break
                if self._publish(item.topic, item.payload, 1, False, item.event_id):
                    sent += 1
        self.published += sent
        return sent

    def publish_stats(self, payload: str) -> None:
        """Stats are not stored: published at QoS 1 only while connected."""
        if self._connected.is_set():
            self._publish(self.stats_topic, payload, 1, False, None)

    def publish_retained(self, topic: str, payload: str) -> None:
        """Retained dashboard state (QoS 1, not in the outbox: it is rebuilt); empty clears the topic."""
        self._publish(topic, payload, 1, True, None)
