"""MQTT publisher (paho-mqtt 2, callback API v2, MQTT 5): availability, outbox events at QoS 1, stats.

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

MQTT 5 because its PUBACK carries a reason code: a broker that refuses a publish (an ACL that does
not let this user write the topic) says so, where MQTT 3.1.1 acknowledges and drops it. A refused
event stays in the outbox, is counted (:attr:`MqttPublisher.refused`) and logged with its topic and
reason, and publishing pauses for a back-off (``reconnect_min_s`` doubling up to ``reconnect_max_s``)
before the outbox is tried again, oldest first. The retained ``online`` status published on every
connect is the probe: a refusal there means the broker's ACL does not let this user publish its
topics, logged as an error at once.

Connection failures are named (:attr:`MqttPublisher.last_error`, logged when the cause changes): broker
unreachable, a TLS handshake against a plain port, a plain connection closed by a TLS port. A
certificate that fails verification (unknown CA, host name mismatch) is fatal, like bad credentials;
an unreadable CA file is a one-line error when the publisher is built.
"""

from __future__ import annotations

import logging
import socket
import ssl
import sys
import threading
import time
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
# paho's own log lines that name no cause (the publisher logs the cause itself): demoted to DEBUG.
# "Client is not connected" is also what paho's network thread logs at every clean stop.
_PAHO_NOISE = ("Client is not connected", "failed to receive on socket")


class MqttError(SettingsError):
    """The MQTT settings cannot work (an unreadable CA file); the message names the problem and the fix."""


class _PahoNoise(logging.Filter):
    """Demote paho's cause-less connection errors to DEBUG (dropped unless DEBUG is enabled)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and str(record.msg).startswith(_PAHO_NOISE):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_paho_logger = logging.getLogger(__name__ + ".paho")
_paho_logger.addFilter(_PahoNoise())


class MqttPublisher:
    """Publishes the outbox, availability and stats to one broker."""

    def __init__(
        self, settings: MqttSettings, room: str, outbox: Outbox, status_topic: str | None = None
    ) -> None:
        self.settings = settings
        self.room = room
        self.prefix = settings.prefix(room)
        self.outbox = outbox
        self.status_topic = status_topic or f"{self.prefix}/status"  # online at connect, the last will
        self.stats_topic = f"{self.prefix}/stats"
        self.fatal_error: str | None = None
        self.ever_connected = False
        self.published = 0
        self.acknowledged = 0
        self.refused = 0  # publishes the broker refused (PUBACK reason code >= 0x80)
        self.last_error: str | None = None  # the last broker problem, named (None once it works)
        self._map_lock = threading.Lock()  # mid -> event id; never held while calling into paho
        self._pump_lock = threading.Lock()  # one pump at a time, so no event is published twice
        self._inflight: dict[int, tuple[str | None, str]] = {}  # mid -> (event id, topic)
        self._refuse_delay_s = 0.0  # back-off after a refused publish (0: none)
        self._retry_at = 0.0  # monotonic time before which refused events are not tried again
        self._refused_in_cycle = 0  # refusals since the last retry started
        self._max_inflight = settings.max_inflight  # lowered to the broker's Receive Maximum on connect
        self._connack_refused = False
        self._early: dict[int, ReasonCode] = {}
        self._connected = threading.Event()
        self.connected_changed = threading.Event()
        self._command_topics: dict[str, str] = {}  # topic -> verb
        self._command_sink: Callable[[str, bytes], None] | None = None
        self._client = self._build_client()
        self._started = False
        self._stopping = False
        self.connects = 0  # successful connections so far (metrics: reconnects)
        self.on_event_published: Callable[[str], None] | None = None  # first PUBLISH of a stored event
        self.on_event_acknowledged: Callable[[str], None] | None = None  # its PUBACK (paho's thread)
        self.on_change: Callable[[], None] | None = None  # connected, disconnected, fatal, more to pump
        self._subscriptions: dict[str, list[Callable[[str, bytes], None]]] = {}  # topic -> callbacks
        self._fails = 0  # failed connection attempts in a row (for the log)

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
            protocol=mqtt.MQTTv5 if s.protocol == "5" else mqtt.MQTTv311,
        )
        client.enable_logger(_paho_logger)
        client.max_inflight_messages_set(s.max_inflight)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(
            min_delay=max(1, round(s.reconnect_min_s)), max_delay=max(1, round(s.reconnect_max_s))
        )
        if s.username is not None:
            client.username_pw_set(s.username, s.resolved_password())
        if s.tls:
            client.tls_set_context(self._tls_context())
        client.will_set(self.status_topic, OFFLINE, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _tls_context(self) -> ssl.SSLContext:
        """Verify the broker's certificate and host name against ``ca_file`` (or the system store)."""
        ca_file = self.settings.ca_file
        if ca_file is None:
            return ssl.create_default_context()
        ca = ca_file.expanduser()
        if not ca.is_file():
            raise MqttError(f"mqtt.ca_file: {ca} does not exist; give the broker's CA certificate (PEM)")
        try:
            return ssl.create_default_context(cafile=str(ca))
        except ssl.SSLError as exc:
            raise MqttError(
                f"mqtt.ca_file: {ca} holds no usable CA certificate ({exc.reason or exc}); "
                "give the broker's CA certificate in PEM format"
            ) from exc
        except (OSError, ValueError) as exc:  # unreadable, or not text at all
            raise MqttError(
                f"mqtt.ca_file: cannot read {ca} ({exc}); give the broker's CA certificate"
            ) from exc

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
    @property
    def _where(self) -> str:
        return f"broker {self.settings.host}:{self.settings.port}"

    def _problem(self, message: str, fatal: bool = False) -> None:
        """Log a named broker problem (once per distinct cause); fatal ones stop the daemon."""
        if fatal:
            self.fatal_error = message
            logger.error("%s", message)
            self._changed()
        elif message != self.last_error:
            logger.warning("%s", message)
        self.last_error = message

    def _on_connect_fail(self, client: mqtt.Client, _u: Any) -> None:
        """A connection attempt failed before CONNECT was sent; paho calls this inside its ``except``."""
        exc = sys.exc_info()[1]
        s = self.settings
        lo, hi = max(1, round(s.reconnect_min_s)), max(1, round(s.reconnect_max_s))
        self._fails += 1
        # paho's back-off: lo * 2^n capped at hi; before the first connection it also waits lo once more
        wait = min(lo * 2**self._fails, hi)
        if self._fails == 1 and not self.ever_connected:
            wait = lo + min(2 * lo, hi)
        waiting = f"; {n} events wait in the outbox" if (n := self.outbox.size()) else ""
        retry = f"retrying in {wait} s{waiting}"
        if isinstance(exc, ssl.SSLCertVerificationError):
            detail = exc.verify_message or str(exc)
            hint = (
                "set mqtt.host to a name the broker's certificate holds"
                if "hostname" in detail.lower() or "ip address mismatch" in detail.lower()
                else "set mqtt.ca_file to the CA that signed the broker's certificate"
            )
            self._problem(f"{self._where}: certificate verify failed: {detail}; {hint}", fatal=True)
        elif isinstance(exc, ConnectionRefusedError):
            self._problem(f"{self._where} unreachable (nothing accepts connections there, or the network is "
                          f"down: is the broker running and mqtt.port right?), {retry}")
        elif isinstance(exc, socket.gaierror):
            self._problem(f"{self._where}: cannot resolve host {s.host!r} ({exc}); {retry}")
        elif s.tls and isinstance(exc, (ssl.SSLError, ConnectionResetError, ConnectionAbortedError)):
            self._problem(
                f"{self._where}: TLS handshake failed ({exc}); is port {s.port} a plain MQTT port? "
                f"use the broker's TLS port (usually 8883) or set mqtt.tls = false; {retry}"
            )
        else:
            self._problem(f"{self._where}: cannot connect ({exc or 'unknown error'}); {retry}")

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, props: Any) -> None:
        if reason.is_failure:
            self._connack_refused = True  # the disconnect that follows is explained already
            name = str(reason)
            if name in _AUTH_REFUSALS:
                self.fatal_error = (
                    f"broker {self.settings.host}:{self.settings.port} refused the connection: "
                    f"bad username or password ({name}); fix mqtt.username / mqtt.password(_file)"
                )
            elif name in _CONFIG_REFUSALS:
                self.fatal_error = f"broker {self.settings.host}:{self.settings.port} refused: {name}"
            if self.fatal_error:
                self.last_error = self.fatal_error
                logger.error("%s", self.fatal_error)
                client.disconnect()  # stops paho's retry loop
                self._changed()
            else:
                self._problem(f"{self._where} refused the connection ({name}); retrying")
            return
        logger.info("connected to MQTT broker %s:%d", self.settings.host, self.settings.port)
        self._fails = 0
        self.connects += 1
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        if self.last_error is not None and self._refused_in_cycle == 0:
            self.last_error = None
        receive_max = getattr(props, "ReceiveMaximum", None)  # the broker's in-flight limit (MQTT 5)
        self._max_inflight = min(self.settings.max_inflight, int(receive_max or 65535))
        self._publish(self.status_topic, ONLINE, 1, True, None)  # the ACL probe: refused -> _refused
        if self._command_topics:  # clean session: subscribe again at every connect
            client.subscribe([(t, 1) for t in self._command_topics])
        self.ever_connected = True
        self._connected.set()
        self.connected_changed.set()
        self._changed()

    def _on_disconnect(self, client: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self.connected_changed.set()
        self._changed()
        refused, self._connack_refused = self._connack_refused, False
        if not was and not refused and not self._stopping and not self.fatal_error:  # closed before CONNACK
            hint = (
                f"is port {self.settings.port} a TLS listener? set mqtt.tls = true and mqtt.ca_file"
                if not self.settings.tls
                else "see the broker's log"
            )
            self._problem(f"{self._where} closed the connection before accepting it ({reason}); {hint}; "
                          "retrying")
        if was and not self._stopping:
            logger.warning(
                "connection to broker %s:%d lost (%s); %d events wait in the outbox; reconnecting",
                self.settings.host,
                self.settings.port,
                reason,
                self.outbox.size(),
            )

    def _on_publish(self, client: mqtt.Client, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        with self._map_lock:
            if mid not in self._inflight:
                self._early[mid] = reason  # PUBACK before publish() returned its mid
                return
            event_id, topic = self._inflight.pop(mid)
        self._settled(event_id, topic, reason)

    def _settled(self, event_id: str | None, topic: str, reason: ReasonCode) -> None:
        if reason.is_failure:
            self._refused(event_id, topic, reason)
            return
        if event_id is None:
            return
        with self._map_lock:
            if self._refused_in_cycle == 0:
                self._refuse_delay_s = 0.0
        self.acknowledged += 1
        if self.on_event_acknowledged is not None:
            self.on_event_acknowledged(event_id)
        self.outbox.remove(event_id)
        if self.outbox.size() > len(self._inflight):  # a backlog: the freed slot takes the next one now
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _refused(self, event_id: str | None, topic: str, reason: ReasonCode) -> None:
        """The broker refused a publish: keep the event, count it, back off, say so loudly."""
        s = self.settings
        self.refused += 1
        with self._map_lock:
            first = self._refused_in_cycle == 0
            self._refused_in_cycle += 1
            if first:
                self._refuse_delay_s = min(s.reconnect_max_s, 2 * self._refuse_delay_s or s.reconnect_min_s)
                self._retry_at = time.monotonic() + self._refuse_delay_s
        user = s.username or "(anonymous)"
        message = (
            f"{self._where} refused the publish to {topic} ({reason}): user {user} may not publish "
            f"under {self.prefix}/; fix the broker's ACL or mqtt.username / room"
        )
        if topic == self.status_topic:
            logger.error("%s; nothing this daemon publishes will arrive", message)
        elif first:
            logger.warning(
                "%s; the event stays in the outbox (%d refused so far), retrying in %.0f s",
                message,
                self.refused,
                self._refuse_delay_s,
            )
        else:
            logger.debug("%s (%d refused so far)", message, self.refused)
        self.last_error = message

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
            early = self._early.pop(info.mid, None)
            if early is None:
                self._inflight[info.mid] = (event_id, topic)
        if early is not None:
            self._settled(event_id, topic, early)
        return True

    def inflight_ids(self) -> set[str]:
        with self._map_lock:
            return {e for e, _ in self._inflight.values() if e is not None}

    def pump(self) -> int:
        """Publish the oldest stored events that are not in flight yet (while connected); returns how many.

        After a refused publish nothing is published until the back-off has passed."""
        if not self._connected.is_set() or self.fatal_error:
            return 0
        with self._map_lock:
            if self._refused_in_cycle:
                if time.monotonic() < self._retry_at:
                    return 0
                self._refused_in_cycle = 0  # a new try: refusals in it double the back-off
        sent = 0
        with self._pump_lock:
            with self._map_lock:  # events and status/stats messages alike count against the limit
                inflight = {e for e, _ in self._inflight.values() if e is not None}
                room = self._max_inflight - len(self._inflight)
            for item in self.outbox.pending(limit=room, exclude=inflight):
                if not self._connected.is_set():
                    break
                if self._publish(item.topic, item.payload, 1, False, item.event_id):
                    sent += 1
                    if self.on_event_published is not None:
                        self.on_event_published(item.event_id)
        self.published += sent
        return sent

    def publish_stats(self, payload: str) -> None:
        """Stats are not stored: published at QoS 1 only while connected."""
        if self._connected.is_set():
            self._publish(self.stats_topic, payload, 1, False, None)

    def publish_to(self, topic: str, payload: str) -> bool:
        """A QoS 1 message that is not stored (another room's stats or answers), only while connected."""
        if not self._connected.is_set():
            return False
        return self._publish(topic, payload, 1, False, None)

    def publish_retained(self, topic: str, payload: str) -> bool:
        """A retained QoS 1 state message (HA discovery, source state), only while connected."""
        if not self._connected.is_set():
            return False
        return self._publish(topic, payload, 1, True, None)

    def subscribe(self, topic: str, callback: Callable[[str, bytes], None]) -> None:
        """Subscribe (now and after every reconnect); ``callback(topic, payload)`` runs in paho's thread.
        Several callbacks of one topic (the rooms of one daemon each follow HA's status) all get every
        message: paho keeps one callback per topic filter, so that one hands each message to them all."""
        callbacks = self._subscriptions.get(topic)
        if callbacks is not None:
            callbacks.append(callback)
            return
        callbacks = self._subscriptions[topic] = [callback]

        def dispatch(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
            payload = bytes(msg.payload)
            for cb in list(callbacks):
                try:
                    cb(msg.topic, payload)
                except Exception:  # paho's thread: one room's callback must not starve the others
                    logger.exception("handling a message on %s failed", msg.topic)

        self._client.message_callback_add(topic, dispatch)
        if self._connected.is_set():
            self._client.subscribe(topic, qos=1)
