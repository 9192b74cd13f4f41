"""The session takeover of issue 15 (item 2), against a real mosquitto started with the shipped
deploy/mosquitto configuration: a client logged in as ``dashboard`` that sends the daemon's client id
(``cryid-nursery``) must not disconnect the daemon; the daemon still connects and its last will works.

The broker, certificates and password file come from tests/test_mosquitto_acl.py (its fixtures).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests import test_mosquitto_acl as acl
from tests.fixtures.cli import cryid_env

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`

ward_broker = acl.ward_broker  # the shipped configuration on test ports (a module-scoped fixture)
client = acl.client
ROOM = acl.ROOM
DAEMON_USER = acl.DAEMON_USER


def _daemon_settings(broker: acl.WardBroker, tmp_path: Path) -> object:
    from cryid.daemon.config import MqttSettings

    return MqttSettings(
        host="127.0.0.1",
        port=broker.plain_port,
        username=DAEMON_USER,
        password=broker.passwords[DAEMON_USER],
        reconnect_min_s=0.2,
        reconnect_max_s=1.0,
    )


def _intruder(port: int, user: str, password: str, client_id: str) -> tuple[mqtt.Client, list[int]]:
    """A paho client that keeps reconnecting with ``client_id``; returns it and its CONNACK codes."""
    codes: list[int] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    c.username_pw_set(user, password)
    c.on_connect = lambda _c, _u, _f, rc, _p: codes.append(rc.value)
    c.reconnect_delay_set(1, 1)
    c.connect("127.0.0.1", port, keepalive=10)
    c.loop_start()
    return c, codes


def test_dashboard_cannot_take_over_the_daemon_session(ward_broker: acl.WardBroker, tmp_path: Path) -> None:
    from cryid.daemon.mqtt import MqttPublisher
    from cryid.daemon.outbox import Outbox

    log = ward_broker.workdir / "mosquitto.log"
    with Outbox.open(tmp_path / "state") as outbox:
        pub = MqttPublisher(_daemon_settings(ward_broker, tmp_path), ROOM, outbox)  # type: ignore[arg-type]
        pub.start()
        try:
            assert pub.wait_connected(15), pub.fatal_error
            start = log.stat().st_size
            intruder, codes = _intruder(
                ward_broker.plain_port, "dashboard", ward_broker.passwords["dashboard"], f"cryid-{ROOM}"
            )
            try:
                deadline = time.monotonic() + 4.0
                drops = 0
                while time.monotonic() < deadline:
                    drops += not pub.connected
                    time.sleep(0.05)
                assert codes and codes[0] == 0, codes  # the intruder is let in, under its own id
            finally:
                intruder.disconnect()
                intruder.loop_stop()
            assert drops == 0, "the daemon was disconnected while the dashboard used its client id"
            with open(log, encoding="utf-8", errors="replace") as fh:
                fh.seek(start)
                tail = fh.read()
            assert "already connected, closing old connection" not in tail, tail
            assert len(codes) == 1, f"the intruder itself was thrown out and reconnected: {codes}"
        finally:
            pub.stop()


_DAEMON = """
import sys, time
from pathlib import Path
from cryid.daemon.config import MqttSettings
from cryid.daemon.mqtt import MqttPublisher
from cryid.daemon.outbox import Outbox
port, password, state = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
s = MqttSettings(host="127.0.0.1", port=port, username="cryid-nursery", password=password,
                 client_id="any-id-the-broker-replaces")
pub = MqttPublisher(s, "nursery", Outbox.open(state))
pub.start()
assert pub.wait_connected(15), pub.fatal_error
print("connected", flush=True)
time.sleep(120)
"""


def test_daemon_connects_and_its_last_will_still_works(
    ward_broker: acl.WardBroker, client: Callable[..., acl.Client], tmp_path: Path
) -> None:
    dash = client("dashboard")
    assert dash.connected().value == 0
    dash.subscribe(f"cryid/{ROOM}/status")
    env = cryid_env()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _DAEMON,
            str(ward_broker.plain_port),
            ward_broker.passwords[DAEMON_USER],
            str(tmp_path / "state"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "connected", proc.stderr
        dash.wait(lambda: (f"cryid/{ROOM}/status", b"online") in dash.messages, "status online")
        os.kill(proc.pid, signal.SIGKILL)  # a crash: no clean disconnect, the broker sends the will
        proc.wait(timeout=10)
        dash.wait(lambda: dash.messages[-1] == (f"cryid/{ROOM}/status", b"offline"), "the last will", 15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    log = (ward_broker.workdir / "mosquitto.log").read_text(errors="replace")
    assert f"as {DAEMON_USER} " in log  # the broker named the daemon's session after its user
