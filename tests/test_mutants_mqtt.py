"""MQTT publisher behaviour that mutation testing showed unchecked (bench/mutation.py daemon/mqtt.py).

A real mosquitto (tests/fixtures/broker.py) and the real outbox; a closed port and an unroutable
address for connection failures. What is checked is what a ward sees: the retained status a dashboard
finds later, the QoS of retained state, the counters and the named problem (``last_error``), and the
log lines an operator reads.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cryid.daemon.config import MqttSettings
from cryid.daemon.mqtt import MqttPublisher
from cryid.daemon.outbox import Outbox
from tests.fixtures.broker import Broker, Subscriber, free_port, wait_until
from tests.reliability.test_mqtt_faults import USERS, TlsBroker, acl_broker, tls_broker  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow  # starts mosquitto: not in `pytest -m "not slow"`


def _settings(host: str, port: int, **kw: Any) -> MqttSettings:
    return MqttSettings(host=host, port=port, **({"reconnect_min_s": 0.2, "reconnect_max_s": 1.0} | kw))


def _retained(broker: Broker, topic: str, qos: int = 1) -> list[mqtt.MQTTMessage]:
    """What a client connecting now gets on ``topic`` (the retained message), subscribed at ``qos``."""
    got: list[mqtt.MQTTMessage] = []
    done = threading.Event()
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex}"
    )
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=qos)
    client.on_message = lambda _c, _u, msg: (got.append(msg), done.set())
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        done.wait(5.0)
    finally:
        client.disconnect()
        client.loop_stop()
    return got


def test_a_dashboard_opened_after_a_clean_stop_sees_offline(mosquitto: Broker, tmp_path: Path) -> None:
    with Outbox.open(tmp_path) as outbox:
        pub = MqttPublisher(_settings(mosquitto.host, mosquitto.port), "ward1", outbox)
        pub.start()
        assert pub.wait_connected(10)
        assert [m.payload for m in _retained(mosquitto, "cryid/ward1/status")] == [b"online"]
        pub.stop()
    got = _retained(mosquitto, "cryid/ward1/status")
    assert [(m.payload, m.retain) for m in got] == [(b"offline", True)]


def test_retained_state_is_published_at_qos_1(mosquitto: Broker, tmp_path: Path) -> None:
    """The contract is QoS 1: a client subscribed at QoS 2 gets the retained state at QoS 1."""
    with Outbox.open(tmp_path) as outbox:
        pub = MqttPublisher(_settings(mosquitto.host, mosquitto.port), "ward1", outbox)
        pub.start()
        try:
            assert pub.wait_connected(10)
            assert pub.publish_retained("cryid/ward1/status/source", "ok") is True
            time.sleep(0.5)
            got = _retained(mosquitto, "cryid/ward1/status/source", qos=2)
            assert [(m.payload, m.qos, m.retain) for m in got] == [(b"ok", 1, True)]
        finally:
            pub.stop()
    assert pub.publish_retained("cryid/ward1/status/source", "down") is False  # not connected: not sent


def test_pump_counts_exactly_what_it_published(
    mosquitto: Broker, subscriber_factory: Callable[..., Subscriber], tmp_path: Path
) -> None:
    sub = subscriber_factory(mosquitto, "cryid/#")
    with Outbox.open(tmp_path) as outbox:
        pub = MqttPublisher(_settings(mosquitto.host, mosquitto.port), "ward1", outbox)
        pub.start()
        try:
            assert pub.wait_connected(10)
            wait_until(lambda: not pub.inflight_ids() and pub.pump() == 0)  # nothing waits: nothing sent
            assert pub.published == 0
            ids = []
            for i in range(7):
                eid = str(uuid.uuid4())
                outbox.add(eid, "episode", pub.event_topic("ada"), json.dumps({"event_id": eid, "i": i}))
                ids.append(eid)
            wait_until(lambda: outbox.size() == 0, pump=pub)
            sub.wait_for(lambda m: set(ids) <= {e["event_id"] for e in sub.events()})
            assert pub.published == 7 and pub.acknowledged == 7
            assert pub.pump() == 0 and pub.published == 7
        finally:
            pub.stop()


def test_a_broker_back_after_an_outage_clears_the_named_problem(
    mosquitto: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While the broker is down ``last_error`` names it (the stats and the log show it); once the
    publisher is connected again the problem is gone, and the first retry after a lost connection is
    announced with the back-off paho uses (2 x reconnect_min_s, at most reconnect_max_s)."""
    caplog.set_level(logging.WARNING, logger="cryid.daemon.mqtt")
    settings = _settings(mosquitto.host, mosquitto.port, reconnect_min_s=1.0, reconnect_max_s=4.0)
    with Outbox.open(tmp_path) as outbox:
        pub = MqttPublisher(settings, "ward1", outbox)
        pub.start()
        try:
            assert pub.wait_connected(10) and pub.ever_connected is True
            assert pub.last_error is None
            mosquitto.stop()
            wait_until(lambda: pub.last_error is not None and "unreachable" in pub.last_error)
            assert pub.last_error.endswith("retrying in 2 s"), pub.last_error
            lost = [r.getMessage() for r in caplog.records if " lost " in r.getMessage()]
            assert len(lost) == 1 and re.fullmatch(
                rf"connection to broker {re.escape(mosquitto.host)}:{mosquitto.port} lost \(.+\); "
                r"0 events wait in the outbox; reconnecting",
                lost[0],
            ), lost
            mosquitto.start()
            wait_until(lambda: pub.connected, timeout_s=30)
            assert pub.last_error is None
        finally:
            pub.stop()


def test_a_broker_that_never_answered_is_retried_as_paho_does(tmp_path: Path) -> None:
    """Nothing listens on the port: the problem names it and says when paho tries again (before the
    first connection paho waits reconnect_min_s once more: 1 + min(2, 1) = 2 s with both at 1 s)."""
    port = free_port()
    with Outbox.open(tmp_path) as outbox:
        outbox.add("e1", "episode", "cryid/ward1/baby/ada", "{}")
        pub = MqttPublisher(
            _settings("127.0.0.1", port, reconnect_min_s=1.0, reconnect_max_s=1.0), "ward1", outbox
        )
        pub.start()
        try:
            wait_until(lambda: pub.last_error is not None, timeout_s=10)
            assert pub.last_error == (
                f"broker 127.0.0.1:{port} unreachable (nothing accepts connections there, or the network is "
                "down: is the broker running and mqtt.port right?), retrying in 2 s; "
                "1 events wait in the outbox"
            )
            wait_until(lambda: "retrying in 1 s" in (pub.last_error or ""), timeout_s=10)
            assert pub.ever_connected is False and pub.fatal_error is None
        finally:
            pub.stop()


def test_an_unusual_connection_failure_is_named_with_its_cause(tmp_path: Path) -> None:
    """A failure without a dedicated message (here: the broadcast address, which no TCP connection can
    reach) still names the operating system's cause, not "unknown error"."""
    with Outbox.open(tmp_path) as outbox:
        pub = MqttPublisher(_settings("255.255.255.255", 1883), "ward1", outbox)
        pub.start()
        try:
            wait_until(lambda: pub.last_error is not None, timeout_s=10)
            pattern = (
                r"^broker 255\.255\.255\.255:1883: cannot connect \(\[Errno \d+\] .+\); retrying in \d+ s$"
            )
            assert re.match(pattern, pub.last_error or ""), pub.last_error
        finally:
            pub.stop()


def test_a_bad_password_stays_the_named_problem(
    mosquitto_auth: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The refusal is fatal and logged once as it is; the disconnect that follows does not replace it
    with a guess about TLS."""
    caplog.set_level(logging.INFO, logger="cryid.daemon.mqtt")
    with Outbox.open(tmp_path) as outbox:
        settings = _settings(mosquitto_auth.host, mosquitto_auth.port, username="ward", password="wrong")
        pub = MqttPublisher(settings, "ward1", outbox)
        pub.start()
        try:
            wait_until(lambda: pub.fatal_error is not None, timeout_s=10)
            time.sleep(0.5)  # the disconnect after the refused CONNACK
            expected = (
                f"broker {mosquitto_auth.host}:{mosquitto_auth.port} refused the connection: bad username or "
                "password (Not authorized); fix mqtt.username / mqtt.password(_file)"
            )
            assert pub.fatal_error == expected and pub.last_error == expected
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert errors == [expected]
        finally:
            pub.stop()


def test_paho_log_lines_with_a_cause_are_kept(caplog: pytest.LogCaptureFixture) -> None:
    """Only paho's cause-less connection lines are demoted; anything else paho logs reaches the log."""
    caplog.set_level(logging.INFO)
    paho_log = logging.getLogger("cryid.daemon.mqtt.paho")
    paho_log.warning("Caught exception in on_message: boom")
    paho_log.error("failed to receive on socket: [Errno 104] Connection reset by peer")
    shown = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert shown == [("WARNING", "Caught exception in on_message: boom")]


def test_a_refused_status_is_an_error_and_a_refused_event_a_warning(
    acl_broker: Broker,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker's ACL does not let this user write the room (icu): the refused ``online`` probe is
    logged as an error saying nothing will arrive; the first refused event as a warning saying it stays
    in the outbox, with the back-off."""
    caplog.set_level(logging.WARNING, logger="cryid.daemon.mqtt")
    settings = _settings(
        acl_broker.host, acl_broker.port, username="cryid-nursery", password=USERS["cryid-nursery"]
    )
    with Outbox.open(tmp_path) as outbox:
        pub = MqttPublisher(settings, "icu", outbox)
        pub.start()
        try:
            assert pub.wait_connected(10)
            wait_until(lambda: pub.refused >= 1)  # the status probe
            outbox.add("e1", "episode", pub.event_topic("ada"), "{}")
            wait_until(lambda: pub.refused >= 2, pump=pub)
        finally:
            pub.stop()
    refusals = [
        (r.levelname, r.getMessage()) for r in caplog.records if "refused the publish" in r.getMessage()
    ]
    where = f"broker {acl_broker.host}:{acl_broker.port} refused the publish to"
    tail = "user cryid-nursery may not publish under cryid/icu/; fix the broker's ACL or mqtt.username / room"
    assert refusals[0] == (
        "ERROR",
        f"{where} cryid/icu/status (Not authorized): {tail}; nothing this daemon publishes will arrive",
    )
    assert refusals[1][0] == "WARNING"
    assert re.fullmatch(
        rf"{re.escape(where)} cryid/icu/baby/ada \(Not authorized\): {re.escape(tail)}; "
        r"the event stays in the outbox \(2 refused so far\), retrying in \d+ s",
        refusals[1][1],
    ), refusals[1][1]


def test_a_certificate_from_another_ca_is_fatal_and_logged_once_as_named(
    tls_broker: TlsBroker,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="cryid.daemon.mqtt")
    settings = MqttSettings(host="localhost", port=tls_broker.tls_port, tls=True, ca_file=tls_broker.other_ca,
                            reconnect_min_s=0.2, reconnect_max_s=0.5)  # fmt: skip
    with Outbox.open(tmp_path) as outbox:
        pub = MqttPublisher(settings, "ward1", outbox)
        pub.start()
        try:
            wait_until(lambda: pub.fatal_error is not None, timeout_s=10)
        finally:
            pub.stop()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors[0] == pub.fatal_error
    assert pub.fatal_error.startswith(f"broker localhost:{tls_broker.tls_port}: certificate verify failed: ")
