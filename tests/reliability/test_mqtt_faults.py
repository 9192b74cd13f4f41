"""The broker side of a ward (issue 15, items 3, 7, 13): refused publishes, TLS mistakes, clean stops.

Real mosquitto on free ports: one with users and an ACL (the shipped ACL's shape), one with a TLS
listener and a plain one, certificates made with ``openssl`` for the test.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cryid.daemon.config import MqttSettings
from cryid.daemon.mqtt import MqttError, MqttPublisher
from cryid.daemon.outbox import Outbox
from tests.fixtures.broker import MOSQUITTO, Broker, Subscriber, free_port, wait_port, wait_until
from tests.fixtures.cli import cryid_env

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`

USERS = {"cryid-nursery": "n-secret", "dashboard": "d-secret"}
ACL = "user dashboard\ntopic read cryid/#\n\nuser cryid-nursery\ntopic write cryid/{room}/#\n"


def _add(outbox: Outbox, pub: MqttPublisher, n: int) -> list[str]:
    ids = []
    for i in range(n):
        eid = str(uuid.uuid4())
        outbox.add(eid, "episode", pub.event_topic(f"b{i}"), json.dumps({"event_id": eid}))
        ids.append(eid)
    return ids


@pytest.fixture()
def acl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """mosquitto with the shipped ACL's shape: the daemon user may write cryid/nursery/# only."""
    broker = Broker(tmp_path_factory.mktemp("mosquitto-acl"), users=USERS)
    acl = broker.workdir / "acl"
    acl.write_text(ACL.format(room="nursery"))
    broker.conf.write_text(broker.conf.read_text() + f"acl_file {acl}\n")
    broker.start()
    yield broker
    broker.stop()


def test_a_refused_publish_stays_in_the_outbox_and_is_retried(
    acl_broker: Broker,
    subscriber_factory: Callable[..., Subscriber],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """CRYID_ROOM=icu with the nursery's user: the broker refuses every publish. Nothing may be lost."""
    sub = subscriber_factory(acl_broker, "cryid/#", username="dashboard", password=USERS["dashboard"])
    settings = MqttSettings(
        host=acl_broker.host, port=acl_broker.port, username="cryid-nursery",
        password=USERS["cryid-nursery"], reconnect_min_s=0.2, reconnect_max_s=1.0,
    )
    caplog.set_level(logging.WARNING, logger="cryid.daemon.mqtt")
    with Outbox.open(tmp_path) as outbox:
        pub = MqttPublisher(settings, "icu", outbox)
        pub.start()
        try:
            assert pub.wait_connected(10)
            ids = _add(outbox, pub, 5)
            wait_until(lambda: pub.refused >= 5, pump=pub)
            deadline = time.monotonic() + 3.0  # keep pumping through several back-off rounds
            while time.monotonic() < deadline:
                pub.pump()
                time.sleep(0.05)
            assert outbox.event_ids() == ids, "a refused event left the outbox"
            assert pub.acknowledged == 0
            text = caplog.text
            assert "refused the publish to cryid/icu/status (Not authorized)" in text  # the start probe
            assert "refused the publish to cryid/icu/baby/" in text and "stays in the outbox" in text
            assert "Not authorized" in (pub.last_error or "")
            assert sub.events() == []
            # The ward's admin fixes the ACL and reloads the broker: the stored events now arrive.
            (acl_broker.workdir / "acl").write_text(ACL.format(room="icu"))
            assert acl_broker.proc is not None
            acl_broker.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: outbox.size() == 0, pump=pub)
            sub.wait_for(lambda m: set(ids) <= {e["event_id"] for e in sub.events()})
        finally:
            pub.stop()


def test_a_clean_stop_logs_no_paho_error(
    mosquitto: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with Outbox.open(tmp_path) as outbox:
        for i in range(20):  # a race between stop and paho's network thread: try it several times
            pub = MqttPublisher(MqttSettings(host=mosquitto.host, port=mosquitto.port), "ward1", outbox)
            pub.start()
            assert pub.wait_connected(10)
            if i % 2:
                _add(outbox, pub, 3)
                wait_until(lambda: outbox.size() == 0, pump=pub)
            pub.stop()
        # What the race does, made certain: one more turn of paho's loop after the disconnect.
        pub._client.loop(0.01)
    bad = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert bad == []


# TLS -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsBroker:
    tls_port: int
    plain_port: int
    ca_file: Path
    other_ca: Path
    workdir: Path


def _openssl(d: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    """A TLS listener whose certificate names ``localhost`` only (not 127.0.0.1) and a plain listener."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (apt-get install openssl)")
    d = tmp_path_factory.mktemp("tls-broker")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
    _openssl(d, "req", "-x509", *ec, "-subj", "/CN=ward CA", "-keyout", "ca.key", "-out", "ca.crt")
    _openssl(d, "req", "-x509", *ec, "-subj", "/CN=other CA", "-keyout", "other.key", "-out", "other.crt")
    _openssl(d, "req", *ec[:-2], "-subj", "/CN=localhost", "-keyout", "broker.key", "-out", "broker.csr")
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost\n")
    _openssl(d, "x509", "-req", "-in", "broker.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", "ext.cnf", "-out", "broker.crt")
    tls_port, plain_port = free_port(), free_port()
    (d / "mosquitto.conf").write_text(
        f"listener {tls_port} 127.0.0.1\ncafile {d}/ca.crt\ncertfile {d}/broker.crt\nkeyfile {d}/broker.key\n"
        f"listener {plain_port} 127.0.0.1\nallow_anonymous true\nuser {_user()}\n"
        f"log_dest file {d}/mosquitto.log\n"
    )
    proc = subprocess.Popen([MOSQUITTO, "-c", str(d / "mosquitto.conf")], stdout=subprocess.DEVNULL)
    try:
        wait_port(tls_port, up=True)
        wait_port(plain_port, up=True)
        yield TlsBroker(tls_port, plain_port, d / "ca.crt", d / "other.crt", d)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _user() -> str:
    import getpass

    return getpass.getuser()


def _tls_publisher(tmp_path: Path, **kw: object) -> tuple[MqttPublisher, Outbox]:
    outbox = Outbox.open(tmp_path / f"state-{uuid.uuid4().hex[:6]}")
    settings = MqttSettings(reconnect_min_s=0.2, reconnect_max_s=0.5, **kw)  # type: ignore[arg-type]
    return MqttPublisher(settings, "ward1", outbox), outbox


def _first_error(pub: MqttPublisher, fatal: bool, timeout_s: float = 10.0) -> str:
    pub.start()
    try:
        wait_until(lambda: (pub.fatal_error if fatal else pub.last_error) is not None, timeout_s)
        return str(pub.fatal_error if fatal else pub.last_error)
    finally:
        pub.stop()


def test_tls_with_the_right_ca_and_name_connects(tls_broker: TlsBroker, tmp_path: Path) -> None:
    pub, outbox = _tls_publisher(tmp_path, host="localhost", port=tls_broker.tls_port, tls=True,
                                 ca_file=tls_broker.ca_file)
    with outbox:
        pub.start()
        try:
            assert pub.wait_connected(10), pub.last_error
        finally:
            pub.stop()


def test_a_wrong_ca_is_named_and_fatal(tls_broker: TlsBroker, tmp_path: Path) -> None:
    pub, outbox = _tls_publisher(tmp_path, host="localhost", port=tls_broker.tls_port, tls=True,
                                 ca_file=tls_broker.other_ca)
    with outbox:
        err = _first_error(pub, fatal=True)
    assert err.startswith(f"broker localhost:{tls_broker.tls_port}: certificate verify failed: ")
    assert "mqtt.ca_file" in err


def test_a_host_name_mismatch_is_named_and_fatal(tls_broker: TlsBroker, tmp_path: Path) -> None:
    pub, outbox = _tls_publisher(tmp_path, host="127.0.0.1", port=tls_broker.tls_port, tls=True,
                                 ca_file=tls_broker.ca_file)
    with outbox:
        err = _first_error(pub, fatal=True)
    assert "certificate verify failed" in err and "mismatch" in err and "mqtt.host" in err


def test_tls_against_a_plain_port_is_named(tls_broker: TlsBroker, tmp_path: Path) -> None:
    pub, outbox = _tls_publisher(tmp_path, host="localhost", port=tls_broker.plain_port, tls=True,
                                 ca_file=tls_broker.ca_file)
    with outbox:
        err = _first_error(pub, fatal=False)
    assert "TLS handshake failed" in err and "plain MQTT port" in err and pub.fatal_error is None


def test_plain_against_a_tls_port_is_named(tls_broker: TlsBroker, tmp_path: Path) -> None:
    pub, outbox = _tls_publisher(tmp_path, host="127.0.0.1", port=tls_broker.tls_port)
    with outbox:
        err = _first_error(pub, fatal=False)
    assert "closed the connection before accepting it" in err and "mqtt.tls = true" in err


def test_a_garbage_ca_file_is_one_clear_error(tmp_path: Path) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_bytes(os.urandom(600))
    with Outbox.open(tmp_path / "state") as outbox, pytest.raises(MqttError, match=r"mqtt\.ca_file: .*pem"):
        MqttPublisher(MqttSettings(tls=True, ca_file=garbage), "ward1", outbox)


def _run_daemon(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    wav = tmp_path / "quiet.wav"
    sf.write(wav, np.zeros(16000, np.float32), 16000)
    full = cryid_env()
    full.update(CRYID_STATE_DIR=str(tmp_path / "state"), CRYID_MQTT__RECONNECT_MIN_S="0.2",
                CRYID_SERVICE__SHUTDOWN_TIMEOUT_S="10", **env)
    return subprocess.run([sys.executable, "-m", "cryid.daemon.cli", "run", "--source", str(wav)],
                          env=full, capture_output=True, text=True, timeout=120)


def test_the_daemon_stops_with_exit_1_on_a_wrong_ca(tls_broker: TlsBroker, tmp_path: Path) -> None:
    proc = _run_daemon(tmp_path, CRYID_MQTT__HOST="localhost", CRYID_MQTT__PORT=str(tls_broker.tls_port),
                       CRYID_MQTT__TLS="true", CRYID_MQTT__CA_FILE=str(tls_broker.other_ca))
    assert proc.returncode == 1, proc.stderr
    assert "certificate verify failed" in proc.stderr
    assert "Traceback" not in proc.stderr and "Client is not connected" not in proc.stderr


def test_the_daemon_names_a_garbage_ca_file_in_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    proc = _run_daemon(tmp_path, CRYID_MQTT__TLS="true", CRYID_MQTT__CA_FILE=str(garbage))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "ca.pem" in ln]
    assert len(lines) == 1 and "mqtt.ca_file" in lines[0], proc.stderr
