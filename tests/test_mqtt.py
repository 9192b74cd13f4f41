"""The MQTT publisher against a real mosquitto: outbox delivery, outages, availability, auth refusal."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from cryid.daemon.config import MqttSettings
from cryid.daemon.mqtt import MqttPublisher
from cryid.daemon.outbox import Outbox
from tests.fixtures.broker import Broker, Subscriber, wait_until

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`


def _settings(broker: Broker, **kw: object) -> MqttSettings:
    return MqttSettings(host=broker.host, port=broker.port, reconnect_min_s=0.2, reconnect_max_s=1.0, **kw)


def _add_events(outbox: Outbox, pub: MqttPublisher, n: int) -> list[str]:
    ids = []
    for i in range(n):
        eid = str(uuid.uuid4())
        outbox.add(eid, "expiration", pub.event_topic(f"b{i % 3}"), json.dumps({"event_id": eid, "i": i}))
        ids.append(eid)
    return ids


def test_events_are_delivered_and_leave_the_outbox_on_puback(
    mosquitto: Broker, subscriber_factory: Callable[..., Subscriber], tmp_path: Path
) -> None:
    sub = subscriber_factory(mosquitto, "cryid/#")
    with Outbox.open(tmp_path) as outbox:
        pub = MqttPublisher(_settings(mosquitto), "ward1", outbox)
        pub.start()
        assert pub.wait_connected(10)
        ids = _add_events(outbox, pub, 30)
        wait_until(lambda: outbox.size() == 0, pump=pub)
        got = sub.wait_for(lambda m: set(ids) <= {e["event_id"] for e in sub.events()})
        assert {e["event_id"] for e in sub.events()} == set(ids)
        topics = {m.topic for m in got}
        assert {"cryid/ward1/baby/b0", "cryid/ward1/baby/b1", "cryid/ward1/baby/b2"} <= topics
        assert any(m.topic == "cryid/ward1/status" and m.payload == b"online" for m in got)
        pub.stop()
    got = sub.wait_for(lambda m: m[-1].topic == "cryid/ward1/status" and m[-1].payload == b"offline")


def test_broker_down_at_start_and_restarted_mid_stream_loses_nothing(
    mosquitto: Broker, subscriber_factory: Callable[..., Subscriber], tmp_path: Path
) -> None:
    sub = subscriber_factory(mosquitto, "cryid/#")  # persistent session: survives the broker restart
    mosquitto.stop()
    with Outbox.open(tmp_path) as outbox:
        pub = MqttPublisher(_settings(mosquitto), "ward1", outbox)
        pub.start()  # broker is down: connect_async keeps retrying
        first = _add_events(outbox, pub, 10)
        assert pub.pump() == 0
        time.sleep(0.5)
        mosquitto.start()
        wait_until(lambda: outbox.size() == 0, pump=pub)
        mosquitto.stop()  # outage in the middle of the stream
        wait_until(lambda: not pub.connected)
        second = _add_events(outbox, pub, 15)
        assert pub.pump() == 0
        assert outbox.size() == 15
        mosquitto.start()
        wait_until(lambda: outbox.size() == 0, pump=pub)
        expected = set(first) | set(second)
        sub.wait_for(lambda m: expected <= {e["event_id"] for e in sub.events()})
        assert {e["event_id"] for e in sub.events()} == expected
        pub.stop()


def test_restart_with_a_non_empty_outbox_publishes_it(
    mosquitto: Broker, subscriber_factory: Callable[..., Subscriber], tmp_path: Path
) -> None:
    sub = subscriber_factory(mosquitto, "cryid/#")
    with Outbox.open(tmp_path) as outbox:  # a previous run stored events and died before publishing
        pub = MqttPublisher(_settings(mosquitto), "ward1", outbox)
        ids = _add_events(outbox, pub, 7)
    with Outbox.open(tmp_path) as outbox:
        pub = MqttPublisher(_settings(mosquitto), "ward1", outbox)
        pub.start()
        wait_until(lambda: outbox.size() == 0, pump=pub)
        sub.wait_for(lambda m: set(ids) <= {e["event_id"] for e in sub.events()})
        pub.stop()


def test_last_will_marks_the_daemon_offline(
    mosquitto: Broker, subscriber_factory: Callable[..., Subscriber], tmp_path: Path
) -> None:
    sub = subscriber_factory(mosquitto, "cryid/ward1/status")
    with Outbox.open(tmp_path) as outbox:
        pub = MqttPublisher(_settings(mosquitto, keepalive_s=5), "ward1", outbox)
        pub.start()
        sub.wait_for(lambda m: bool(m) and m[-1].payload == b"online")
        pub._client._sock_close()  # the connection dies without DISCONNECT (as on a crash)
        pub._client.loop_stop()
        sub.wait_for(lambda m: m[-1].payload == b"offline", timeout_s=20)


def test_bad_password_is_fatal_with_a_clear_message(mosquitto_auth: Broker, tmp_path: Path) -> None:
    with Outbox.open(tmp_path) as outbox:
        pub = MqttPublisher(_settings(mosquitto_auth, username="ward", password="wrong"), "ward1", outbox)
        pub.start()
        wait_until(lambda: pub.fatal_error is not None, timeout_s=10)
        assert "bad username or password" in (pub.fatal_error or "")
        assert not pub.connected
        pub.stop()


def test_password_file_from_credentials_directory(
    mosquitto_auth: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mqtt-password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    settings = _settings(mosquitto_auth, username="ward", password_file=Path("mqtt-password"))
    with Outbox.open(tmp_path / "state") as outbox:
        pub = MqttPublisher(settings, "ward1", outbox)
        pub.start()
        assert pub.wait_connected(10)
        assert pub.fatal_error is None
        pub.stop()


def test_unreadable_password_file_names_the_field(tmp_path: Path) -> None:
    settings = MqttSettings(username="ward", password_file=tmp_path / "missing")
    with pytest.raises(ValueError, match=r"mqtt\.password_file"):
        settings.resolved_password()
