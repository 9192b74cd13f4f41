"""Home Assistant MQTT discovery from a running daemon, read back from a real mosquitto.

Every config is checked against the keys Home Assistant documents for its component
(https://www.home-assistant.io/integrations/event.mqtt/, .../binary_sensor.mqtt/, .../sensor.mqtt/,
and the shared ``device`` map of https://www.home-assistant.io/integrations/mqtt/): the required keys
are present, and no key is outside the documented ones (HA rejects a discovery config with an
unknown key).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cryid.daemon.config import MqttSettings, ServiceSettings, Settings
from cryid.daemon.homeassistant import HomeAssistantSettings
from cryid.daemon.mqtt import MqttPublisher
from cryid.daemon.outbox import Outbox
from cryid.daemon.service import Service, load_embedder
from cryid.daemon.sources import StdinSource
from cryid.enrollment.registry import Registry
from tests.fixtures.broker import Broker, Received, Subscriber
from tests.test_metrics_http import enroll_state, model_dir, wait

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`

ROOM = "ward7"
BABIES = ["ada", "ben", "cy"]

# Keys every MQTT entity may carry (HA's MQTT docs, "Configuration variables" of each platform).
_COMMON = {
    "availability", "availability_mode", "availability_template", "availability_topic", "device",
    "enabled_by_default", "encoding", "entity_category", "entity_picture", "icon", "json_attributes_template",
    "json_attributes_topic", "name", "object_id", "payload_available", "payload_not_available", "qos",
    "unique_id",
}  # fmt: skip
SCHEMA: dict[str, dict[str, set[str]]] = {
    "event": {
        "required": {"state_topic", "event_types"},
        "allowed": _COMMON | {"state_topic", "event_types", "device_class", "value_template"},
    },
    "binary_sensor": {
        "required": {"state_topic"},
        "allowed": _COMMON
        | {
            "state_topic",
            "device_class",
            "expire_after",
            "force_update",
            "off_delay",
            "payload_off",
            "payload_on",
            "value_template",
        },
    },
    "sensor": {
        "required": {"state_topic"},
        "allowed": _COMMON
        | {
            "state_topic",
            "device_class",
            "expire_after",
            "force_update",
            "last_reset_value_template",
            "options",
            "state_class",
            "suggested_display_precision",
            "unit_of_measurement",
            "value_template",
        },
    },
}
DEVICE_KEYS = {
    "configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model", "model_id",
    "name", "serial_number", "suggested_area", "sw_version", "via_device",
}  # fmt: skip
BINARY_SENSOR_CLASSES = {"sound", "problem", "connectivity", "running", "occupancy"}  # the ones worth using
ENTITY_CATEGORIES = {"config", "diagnostic"}


def check_config(topic: str, cfg: dict[str, Any]) -> None:
    component = topic.split("/")[1]
    schema = SCHEMA[component]
    assert schema["required"] <= set(cfg), (topic, schema["required"] - set(cfg))
    assert set(cfg) <= schema["allowed"], (topic, set(cfg) - schema["allowed"])
    assert set(cfg["device"]) <= DEVICE_KEYS and cfg["device"]["identifiers"] == [f"cryid_{ROOM}"]
    assert cfg["availability_topic"] == f"cryid/{ROOM}/status"
    assert (cfg["payload_available"], cfg["payload_not_available"]) == ("online", "offline")
    assert cfg["unique_id"].startswith(f"cryid_{ROOM}_") and cfg["unique_id"].split("_")[-1] in topic
    assert cfg.get("entity_category", "diagnostic") in ENTITY_CATEGORIES
    if component == "binary_sensor":
        assert cfg["device_class"] in BINARY_SENSOR_CLASSES
    if component == "event":
        assert cfg["event_types"] == ["expiration", "episode"]
    if component == "sensor" and cfg.get("device_class") == "enum":
        assert cfg["options"] and "unit_of_measurement" not in cfg and "state_class" not in cfg
    assert cfg["state_topic"].startswith(f"cryid/{ROOM}/")


def configs(sub: Subscriber) -> dict[str, bytes]:
    """The last payload seen per discovery topic."""
    out: dict[str, bytes] = {}
    for m in list(sub.messages):
        if m.topic.endswith("/config"):
            out[m.topic] = m.payload
    return out


def retained(broker: Broker, topic: str, timeout_s: float = 3.0) -> list[Received]:
    """What a new client is given for ``topic`` (the broker's retained messages)."""
    got: list[Received] = []
    done = threading.Event()
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="ha-probe")
    c.on_connect = lambda cl, *_: cl.subscribe(topic, qos=1)
    c.on_message = lambda _c, _u, msg: got.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))
    c.connect(broker.host, broker.port)
    c.loop_start()
    done.wait(timeout_s)
    c.disconnect()
    c.loop_stop()
    return got


class Daemon:
    """The service on a pipe source that delivers nothing (the discovery needs no audio)."""

    def __init__(self, settings: Settings) -> None:
        rfd, wfd = os.pipe()
        self.reader, self.writer = os.fdopen(rfd, "rb", buffering=0), os.fdopen(wfd, "wb", buffering=0)
        outbox = Outbox.open(settings.state_dir, settings.outbox)
        self.service = Service(
            settings,
            StdinSource(self.reader),
            load_embedder(settings),
            Registry.open(settings.state_dir, settings.registry),
            outbox,
            MqttPublisher(settings.mqtt, settings.room, outbox),
        )
        self.codes: list[int] = []
        self.thread = threading.Thread(target=lambda: self.codes.append(self.service.run()))
        self.thread.start()

    def stop(self) -> int:
        self.writer.close()
        self.thread.join(timeout=60)
        self.service.close()
        self.reader.close()
        return self.codes[0]


@pytest.fixture()
def daemons() -> Iterator[list[Daemon]]:
    made: list[Daemon] = []
    yield made
    for d in made:
        if d.thread.is_alive():
            d.stop()


def test_discovery_configs_roster_changes_and_ha_restart(
    request: pytest.FixtureRequest,
    mosquitto: Broker,
    subscriber_factory: Callable[..., Subscriber],
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    model = model_dir(request)
    state = tmp_path / "state"
    enroll_state(state, model, BABIES, room=ROOM)
    settings = Settings(
        room=ROOM,
        state_dir=state,
        model=model,
        mqtt=MqttSettings(host=mosquitto.host, port=mosquitto.port, reconnect_min_s=0.2, reconnect_max_s=1.0),
        service=ServiceSettings(shutdown_timeout_s=5.0),
        homeassistant=HomeAssistantSettings(enabled=True),
    )
    sub = subscriber_factory(mosquitto, "homeassistant/#")
    daemons.append(Daemon(settings))
    n_room, per_baby = 4, 2
    wait(lambda: len(configs(sub)) == n_room + per_baby * len(BABIES), "every discovery config")
    got = configs(sub)
    for topic, payload in got.items():
        check_config(topic, json.loads(payload))
    comps = sorted(t.split("/")[1] for t in got)
    assert comps == sorted(["binary_sensor"] * 4 + ["event"] * 4 + ["sensor"] * 2)
    node = f"homeassistant/%s/cryid_{ROOM}/%s/config"
    ada_event = json.loads(got[node % ("event", "baby_ada_cry")])
    assert ada_event["state_topic"] == f"cryid/{ROOM}/baby/ada"
    assert "value_template" in ada_event and "event_type" in ada_event["value_template"]
    mic = json.loads(got[node % ("sensor", "microphone")])
    assert mic["state_topic"] == f"cryid/{ROOM}/status/source" and mic["options"] == ["ok", "flat", "down"]
    assert json.loads(got[node % ("binary_sensor", "crying")])["state_topic"] == f"cryid/{ROOM}/status/crying"
    assert json.loads(got[node % ("sensor", "level")])["state_topic"] == f"cryid/{ROOM}/stats"
    # retained: a Home Assistant that connects later gets them all
    assert {m.topic for m in retained(mosquitto, "homeassistant/#") if m.retain} == set(got)

    # a baby discharged: its two entities are deleted (empty retained config), nothing else changes
    with Registry.open(state, settings.registry) as registry, registry.write() as tx:
        tx.set_status("ben", "discharged")
    wait(lambda: configs(sub)[node % ("event", "baby_ben_cry")] == b"", "ben's event deleted")
    wait(lambda: configs(sub)[node % ("binary_sensor", "baby_ben_crying")] == b"", "ben's sensor deleted")
    assert {t for t, p in configs(sub).items() if p == b""} == {
        node % ("event", "baby_ben_cry"),
        node % ("binary_sensor", "baby_ben_crying"),
    }
    assert not any("baby_ben" in m.topic for m in retained(mosquitto, "homeassistant/#"))

    # Home Assistant restarts and announces itself: every config of the current roster again
    before = len(sub.messages)
    ha = subscriber_factory(mosquitto, "nothing")
    ha.client.publish("homeassistant/status", "online", qos=1)
    wait(lambda: len(configs_after(sub, before)) == n_room + per_baby * 2, "republished configs")
    assert not any("baby_ben" in t for t in configs_after(sub, before))
    assert daemons[0].stop() == 0

    # cy is removed while cryid is stopped: the next start deletes cy's entities too
    with Registry.open(state, settings.registry) as registry, registry.write() as tx:
        tx.delete_infant("cy")
    before = len(sub.messages)
    daemons.append(Daemon(settings))
    wait(lambda: configs_after(sub, before).get(node % ("event", "baby_cy_cry")) == b"", "cy deleted")
    left = {m.topic for m in retained(mosquitto, "homeassistant/#")}
    assert {t.split("/")[3] for t in left} == {"crying", "unknown_cry", "microphone", "level",
                                               "baby_ada_cry", "baby_ada_crying"}  # fmt: skip
    assert daemons[1].stop() == 0


def configs_after(sub: Subscriber, start: int) -> dict[str, bytes]:
    return {m.topic: m.payload for m in list(sub.messages)[start:] if m.topic.endswith("/config")}


def test_discovery_is_off_by_default(
    request: pytest.FixtureRequest,
    mosquitto: Broker,
    subscriber_factory: Callable[..., Subscriber],
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    settings = Settings(
        room=ROOM,
        state_dir=tmp_path / "state",
        model=model_dir(request),
        mqtt=MqttSettings(host=mosquitto.host, port=mosquitto.port),
        service=ServiceSettings(shutdown_timeout_s=5.0),
    )
    sub = subscriber_factory(mosquitto, "#")
    daemons.append(Daemon(settings))
    wait(lambda: any(m.topic == f"cryid/{ROOM}/status/source" for m in sub.messages), "source status")
    assert daemons[0].stop() == 0
    assert not any(m.topic.startswith("homeassistant/") for m in sub.messages)
    assert not (tmp_path / "state" / "homeassistant.json").exists()


def test_discovery_under_the_recommended_acl(
    request: pytest.FixtureRequest,
    subscriber_factory: Callable[..., Subscriber],
    daemons: list[Daemon],
    tmp_path: Path,
) -> None:
    """The ACL lines docs/admin.md gives: the daemon's user writes its own room's discovery configs and
    reads HA's status, nothing of another room; HA's user reads everything and announces itself."""
    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker", users={f"cryid-{ROOM}": "daemon-pw", "ha": "ha-pw"})
    acl = tmp_path / "acl"
    acl.write_text(
        f"user cryid-{ROOM}\ntopic write cryid/{ROOM}/#\ntopic write homeassistant/+/cryid_{ROOM}/#\n"
        "topic read homeassistant/status\n"
        "user ha\ntopic read cryid/#\ntopic read homeassistant/#\ntopic write homeassistant/status\n"
    )
    with broker.conf.open("a") as f:
        f.write(f"acl_file {acl}\n")
    broker.start()
    request.addfinalizer(broker.stop)
    state = tmp_path / "state"
    enroll_state(state, model_dir(request), ["ada"], room=ROOM)
    settings = Settings(
        room=ROOM,
        state_dir=state,
        model=model_dir(request),
        mqtt=MqttSettings(host=broker.host, port=broker.port, username=f"cryid-{ROOM}", password="daemon-pw"),
        service=ServiceSettings(shutdown_timeout_s=5.0),
        homeassistant=HomeAssistantSettings(enabled=True),
    )
    ha = subscriber_factory(broker, "homeassistant/#", username="ha", password="ha-pw")
    daemons.append(Daemon(settings))
    wait(lambda: len(configs(ha)) == 6, "the room's and ada's configs through the ACL")
    before = len(ha.messages)
    ha.client.publish("homeassistant/status", "online", qos=1)  # the daemon may read it: republished
    wait(lambda: len(configs_after(ha, before)) == 6, "republished configs")
    # the daemon's user cannot touch another room's entities
    other = "homeassistant/sensor/cryid_other/level/config"
    intruder = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="intruder")
    intruder.username_pw_set(f"cryid-{ROOM}", "daemon-pw")
    intruder.connect(broker.host, broker.port)
    intruder.loop_start()
    intruder.publish(other, "{}", qos=1, retain=True).wait_for_publish(5)
    own = f"homeassistant/sensor/cryid_{ROOM}/probe/config"
    intruder.publish(own, "", qos=1, retain=True).wait_for_publish(5)  # a control that does pass
    intruder.disconnect()
    intruder.loop_stop()
    wait(lambda: any(m.topic == own for m in ha.messages), "the control message")
    assert not any(m.topic == other for m in ha.messages)
    assert daemons[0].stop() == 0
