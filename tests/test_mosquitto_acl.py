"""The ward broker exactly as deploy/mosquitto/ configures it, on test ports with test credentials.

The test makes a CA and a broker certificate with ``openssl``, the password file with
``mosquitto_passwd``, and starts mosquitto with deploy/mosquitto/mosquitto.conf in which only the
listener ports (bound to 127.0.0.1) and the file paths are replaced; deploy/mosquitto/acl is used as is.
"""

from __future__ import annotations

import getpass
import json
import re
import shutil
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.fixtures.broker import MOSQUITTO, free_port, wait_port

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "deploy" / "mosquitto" / "mosquitto.conf"
ACL = REPO / "deploy" / "mosquitto" / "acl"
DAEMON_USER = "cryid-nursery"  # the ACL's example daemon user (room "nursery")
ROOM = "nursery"


@dataclass(frozen=True)
class WardBroker:
    plain_port: int
    tls_port: int
    ws_port: int
    ca_file: Path
    passwords: dict[str, str]
    workdir: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(d: Path) -> None:
    """A throw-away CA and a broker certificate for 127.0.0.1 / localhost (EC P-256: fast)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=cryid test CA",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    _openssl("req", *ec, "-subj", "/CN=localhost", "-keyout", "broker.key", "-out", "broker.csr", cwd=d)
    (d / "ext.cnf").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    _openssl("x509", "-req", "-in", "broker.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", "ext.cnf", "-out", "broker.crt", cwd=d)


def ward_config(d: Path, ports: tuple[int, int, int]) -> str:
    """deploy/mosquitto/mosquitto.conf with test ports and paths; everything else unchanged."""
    paths = {
        "password_file": d / "passwd", "acl_file": ACL,
        "cafile": d / "ca.crt", "certfile": d / "broker.crt", "keyfile": d / "broker.key",
    }
    listeners = iter(ports)
    out, replaced = [], {k: 0 for k in [*paths, "listener"]}
    for line in CONF.read_text().splitlines():
        key = line.split(" ", 1)[0]
        if key == "listener":
            line = f"listener {next(listeners)} 127.0.0.1"
        elif key in paths:
            line = f"{key} {paths[key]}"
        else:
            out.append(line)
            continue
        replaced[key] += 1
        out.append(line)
    assert replaced == {"password_file": 1, "acl_file": 1, "cafile": 2, "certfile": 2, "keyfile": 2,
                        "listener": 3}, f"deploy/mosquitto/mosquitto.conf changed shape: {replaced}"
    # Test-only: stay the current user (as root mosquitto would switch to 'mosquitto'), log here.
    out += [f"user {getpass.getuser()}", "persistence false", f"log_dest file {d}/mosquitto.log"]
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def ward_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WardBroker]:
    for tool in ("openssl", "mosquitto_passwd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install openssl mosquitto; .ci/run does it)")
    d = tmp_path_factory.mktemp("ward-broker")
    make_certificates(d)
    passwords = {"dashboard": uuid.uuid4().hex, DAEMON_USER: uuid.uuid4().hex, "nurse": uuid.uuid4().hex}
    (d / "passwd").write_text("")
    for user, pw in passwords.items():
        subprocess.run(["mosquitto_passwd", "-b", str(d / "passwd"), user, pw], check=True)
    ports = (free_port(), free_port(), free_port())
    (d / "mosquitto.conf").write_text(ward_config(d, ports))
    proc = subprocess.Popen([MOSQUITTO, "-c", str(d / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        for port in ports:
            wait_port(port, up=True)
    except TimeoutError:
        proc.kill()
        raise RuntimeError(f"mosquitto did not start: {proc.communicate()[1]!r}") from None
    yield WardBroker(*ports, ca_file=d / "ca.crt", passwords=passwords, workdir=d)
    proc.terminate()
    proc.wait(timeout=10)


class Client:
    """A paho MQTT 5 client that records CONNACK, SUBACK, PUBACK reason codes and messages."""

    def __init__(self, port: int, user: str | None, password: str | None, ca_file: Path | None,
                 transport: str = "tcp") -> None:
        self.cond = threading.Condition()
        self.connack: Any = None
        self.subacks: dict[int, list[Any]] = {}
        self.pubacks: dict[int, Any] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}",
                             protocol=mqtt.MQTTv5, transport=transport)  # type: ignore[arg-type]
        if user is not None:
            self.c.username_pw_set(user, password)
        if ca_file is not None:
            self.c.tls_set(ca_certs=str(ca_file), cert_reqs=ssl.CERT_REQUIRED)
        self.c.on_connect = lambda _c, _u, _f, rc, _p: self._set("connack", rc)
        self.c.on_subscribe = lambda _c, _u, mid, rcs, _p: self._put(self.subacks, mid, list(rcs))
        self.c.on_publish = lambda _c, _u, mid, rc, _p: self._put(self.pubacks, mid, rc)
        self.c.on_message = lambda _c, _u, m: self._put_msg(m.topic, bytes(m.payload))
        self.c.connect("127.0.0.1", port, keepalive=10)
        self.c.loop_start()

    def _set(self, name: str, value: Any) -> None:
        with self.cond:
            setattr(self, name, value)
            self.cond.notify_all()

    def _put(self, table: dict[int, Any], key: int, value: Any) -> None:
        with self.cond:
            table[key] = value
            self.cond.notify_all()

    def _put_msg(self, topic: str, payload: bytes) -> None:
        with self.cond:
            self.messages.append((topic, payload))
            self.cond.notify_all()

    def wait(self, pred: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
        with self.cond:
            if not self.cond.wait_for(pred, timeout_s):
                raise TimeoutError(f"no {what} within {timeout_s} s")

    def connected(self) -> Any:
        self.wait(lambda: self.connack is not None, "CONNACK")
        return self.connack

    def subscribe(self, *topics: str) -> list[Any]:
        _, mid = self.c.subscribe([(t, 1) for t in topics])
        self.wait(lambda: mid in self.subacks, "SUBACK")
        return self.subacks[mid]

    def publish(self, topic: str, payload: str, retain: bool = False) -> Any:
        """QoS 1; returns the PUBACK reason code. mosquitto queues what the publish delivers to this
        client's own subscriptions before the PUBACK, so on return any such delivery has arrived."""
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        self.wait(lambda: info.mid in self.pubacks, "PUBACK")
        return self.pubacks[info.mid]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def client(ward_broker: WardBroker) -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(user: str | None, port: int | None = None, tls: bool = True, password: str | None = None,
             transport: str = "tcp") -> Client:
        c = Client(port or ward_broker.tls_port, user,
                   password if password is not None else ward_broker.passwords.get(user or ""),
                   ward_broker.ca_file if tls else None, transport)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def test_anonymous_and_wrong_passwords_are_refused(
    ward_broker: WardBroker, client: Callable[..., Client]
) -> None:
    assert client(None).connected().value == 135  # Not authorized (TLS listener)
    assert client(None, port=ward_broker.plain_port, tls=False).connected().value == 135
    assert client(None, port=ward_broker.ws_port, transport="websockets").connected().value == 135
    assert client("dashboard", password="wrong").connected().value in (134, 135)  # 2.0.11: 135
    assert client("intruder", password="x").connected().value in (134, 135)
    assert client("dashboard").connected().value == 0


def test_dashboard_can_read_but_not_publish(client: Callable[..., Client]) -> None:
    dash = client("dashboard")
    assert dash.connected().value == 0
    assert [rc.value for rc in dash.subscribe(f"cryid/{ROOM}/#")] == [1]  # granted QoS 1
    daemon = client(DAEMON_USER)
    assert daemon.connected().value == 0
    forged = f"cryid/{ROOM}/baby/forged"
    assert dash.publish(forged, "{}").value == 135  # PUBACK: Not authorized
    assert not daemon.publish(f"cryid/{ROOM}/baby/0001", '{"n": 1}').is_failure
    dash.wait(lambda: len(dash.messages) >= 1, "the daemon's message")
    # The broker handled the forged publish first: had it passed, it would have arrived first.
    assert dash.messages == [(f"cryid/{ROOM}/baby/0001", b'{"n": 1}')]


def test_daemon_can_publish_its_room_only_and_read_nothing(client: Callable[..., Client]) -> None:
    # mosquitto 2.0 grants every SUBACK and applies the read ACL when it delivers; the PUBACK of a
    # publish comes after the deliveries it causes (and after the retained messages of an earlier
    # subscribe), so "nothing before the PUBACK" means nothing was delivered.
    retained = f"cryid/{ROOM}/status/acl-test"  # a topic it may write (it reads only its room's cmd/#)
    daemon = client(DAEMON_USER)
    assert daemon.connected().value == 0
    try:
        assert not daemon.publish(retained, "retained", retain=True).is_failure
        daemon.subscribe("#", "$SYS/#", "cryid/other-room/#", f"cryid/{ROOM}/#")
        assert not daemon.publish(f"cryid/{ROOM}/baby/0001", "{}").is_failure  # its own room: allowed
        assert daemon.publish("cryid/other-room/baby/0001", "{}").value == 135
        assert daemon.publish("hospital/other-system", "{}").value == 135
        assert daemon.messages == []  # not its own events, not the retained one, not $SYS
        # Control: the same sequence for a user who may read delivers the retained message.
        dash = client("dashboard")
        assert dash.connected().value == 0
        dash.subscribe("#", "$SYS/#")
        assert dash.publish(f"cryid/{ROOM}/baby/0001", "{}").value == 135
        assert dash.messages == [(retained, b"retained")]
    finally:
        daemon.publish(retained, "", retain=True)  # clear it for the other tests


def _event(room: str, baby_id: str) -> Any:
    from cryid.daemon.events import CryEvent

    now = datetime.now(timezone.utc)
    return CryEvent(
        event_id=str(uuid.uuid4()), episode_id=str(uuid.uuid4()), kind="episode", decision="identified",
        baby_id=baby_id, best_baby_id=baby_id, score=0.71, runner_up={"baby_id": "0002", "score": 0.42},
        margin=0.29, confidence=0.97, candidates=[{"baby_id": baby_id, "score": 0.71, "probability": 0.97}],
        n_candidates=2, started_at=now, ended_at=now, stream_offset_s=12.5, duration_s=0.0, n_expirations=3,
        level_dbfs=-21.0, model_sha256="0" * 64, room=room,
    )


def test_daemon_events_arrive_over_tls_and_websockets(
    ward_broker: WardBroker, client: Callable[..., Client], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's own publisher, configured by deploy/cryid.toml + the systemd credential, over TLS;
    the mosquitto_sub line of docs/mqtt.md and a browser-style websockets client both receive the event."""
    from cryid.daemon.config import Settings
    from cryid.daemon.mqtt import MqttPublisher
    from cryid.daemon.outbox import Outbox

    if shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto_sub is not installed (Debian: apt-get install mosquitto-clients)")
    creds = tmp_path / "credentials"  # what systemd's LoadCredential= provides
    creds.mkdir()
    (creds / "mqtt-password").write_text(ward_broker.passwords[DAEMON_USER] + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("CRYID_CONFIG", str(REPO / "deploy" / "cryid.toml"))
    monkeypatch.setenv("CRYID_MQTT__PORT", str(ward_broker.tls_port))
    monkeypatch.setenv("CRYID_MQTT__TLS", "true")
    monkeypatch.setenv("CRYID_MQTT__CA_FILE", str(ward_broker.ca_file))
    monkeypatch.setenv("CRYID_MQTT__RECONNECT_MIN_S", "0.2")
    settings = Settings(state_dir=tmp_path / "state")
    assert settings.mqtt.username == DAEMON_USER and settings.room == ROOM

    # the browser signs in as the nurse: with client id = user name, a second `dashboard` login (the
    # mosquitto_sub below) would take over its session
    browser = client("nurse", port=ward_broker.ws_port, transport="websockets")
    assert browser.connected().value == 0
    assert [rc.value for rc in browser.subscribe(f"cryid/{ROOM}/#")] == [1]

    with Outbox.open(tmp_path / "state") as outbox:
        pub = MqttPublisher(settings.mqtt, settings.room, outbox)
        pub.start()
        assert pub.wait_connected(15), pub.fatal_error
        # The dashboard example of docs/mqtt.md; the retained status shows it is subscribed.
        sub = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(ward_broker.tls_port),
             "--cafile", str(ward_broker.ca_file), "-u", "dashboard",
             "-P", ward_broker.passwords["dashboard"], "-t", f"cryid/{ROOM}/#", "-v", "-C", "2", "-W", "30"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            assert sub.stdout is not None
            assert sub.stdout.readline().strip() == f"cryid/{ROOM}/status online"
            event = _event(ROOM, "0001")
            outbox.add(event.event_id, event.kind, pub.event_topic("0001"), event.to_json())
            deadline = time.monotonic() + 20
            while outbox.size() and time.monotonic() < deadline:
                pub.pump()
                time.sleep(0.05)
            assert outbox.size() == 0, "the broker did not acknowledge the event"
            line = sub.stdout.readline().strip()
            assert sub.wait(timeout=30) == 0, sub.stderr.read() if sub.stderr else ""
        finally:
            if sub.poll() is None:
                sub.kill()
            pub.stop()
    topic, payload = line.split(" ", 1)
    assert topic == f"cryid/{ROOM}/baby/0001"
    got = json.loads(payload)
    assert got["event_id"] == event.event_id and got["decision"] == "identified" and got["baby_id"] == "0001"
    browser.wait(lambda: any(t.endswith("/baby/0001") for t, _ in browser.messages), "the event over wss")
    ws_payload = next(p for t, p in browser.messages if t.endswith("/baby/0001"))
    assert json.loads(ws_payload)["event_id"] == event.event_id
    log = (ward_broker.workdir / "mosquitto.log").read_text()
    assert re.search(rf"New client connected .* as cryid-{ROOM} .*u'{DAEMON_USER}'", log), log[-2000:]


def test_only_the_nurse_may_send_commands(client: Callable[..., Client]) -> None:
    """cmd/confirm|reject|undo: the nurse may publish them (any room), nobody else; the daemon user reads
    its own room's commands only and answers on cmd/result, which the nurse cannot forge."""
    nurse, dash, daemon = client("nurse"), client("dashboard"), client(DAEMON_USER)
    assert [c.connected().value for c in (nurse, dash, daemon)] == [0, 0, 0]
    daemon.subscribe(f"cryid/{ROOM}/cmd/#", "cryid/other-room/cmd/#")
    nurse.subscribe(f"cryid/{ROOM}/cmd/result")
    cmd = f"cryid/{ROOM}/cmd/confirm"
    assert dash.publish(cmd, '{"request_id": "d"}').value == 135  # the dashboard: read-only
    assert daemon.publish(cmd, '{"request_id": "x"}').value == 135  # a daemon cannot command itself
    assert nurse.publish(f"cryid/{ROOM}/cmd/result", '{"ok": true}').value == 135  # no forged answers
    assert nurse.publish(f"cryid/{ROOM}/baby/0001", "{}").value == 135  # no forged events
    assert nurse.publish("cryid/other-room/cmd/reject", '{"request_id": "o"}').value == 0
    for verb in ("confirm", "reject", "undo"):
        assert nurse.publish(f"cryid/{ROOM}/cmd/{verb}", f'{{"request_id": "{verb}"}}').value == 0
    assert not daemon.publish(f"cryid/{ROOM}/cmd/result", '{"request_id": "undo"}').is_failure
    nurse.wait(lambda: len(nurse.messages) >= 1, "the daemon's answer")
    assert nurse.messages == [(f"cryid/{ROOM}/cmd/result", b'{"request_id": "undo"}')]
    # delivered before its own PUBACK: its room's 3 commands (and its own answer), not the other room's
    verbs = ("confirm", "reject", "undo", "result")
    assert [t for t, _ in daemon.messages] == [f"cryid/{ROOM}/cmd/{v}" for v in verbs]


def test_nurse_confirms_over_the_ward_broker_and_the_daemon_answers(
    ward_broker: WardBroker, client: Callable[..., Client], tmp_path: Path, dac_dir: Path
) -> None:
    """The daemon as deployed (its user, TLS, the shipped ACL) with real cries kept as episodes: the
    nurse's confirm, reject and undo are applied and answered; the dashboard's and anonymous ones never
    reach it; bad commands are answered ok=false and leave the registry unchanged."""
    from cryid.daemon.config import MqttSettings, Settings
    from cryid.daemon.feedback import MAX_COMMAND_BYTES
    from cryid.enrollment.registry import Registry
    from cryid.models.config import DEFAULT_MODEL_DIR
    from cryid.models.embedder import Embedder
    from tests.fixtures.ward import PipedDaemon, enroll_room, files, keep, registry_dump

    state = tmp_path / "state"
    embedder = Embedder(DEFAULT_MODEL_DIR)
    with Registry.open(state) as reg:
        a, b = enroll_room(reg, embedder, dac_dir, ROOM, n=2)
        ep_a, ep_b = (keep(reg, embedder, files(dac_dir, x, "D")[0], ROOM, named=b) for x in (a, b))
        ep_nicu = keep(reg, embedder, files(dac_dir, a, "D")[0], "nicu")
    creds = tmp_path / "mqtt-password"
    creds.write_text(ward_broker.passwords[DAEMON_USER])
    settings = Settings(
        room=ROOM, state_dir=state, model=DEFAULT_MODEL_DIR,
        mqtt=MqttSettings(host="127.0.0.1", port=ward_broker.tls_port, tls=True, ca_file=ward_broker.ca_file,
                          username=DAEMON_USER, password_file=creds, reconnect_min_s=0.2),
    )
    nurse, dash, anon = client("nurse"), client("dashboard"), client(None)
    assert nurse.connected().value == 0 and dash.connected().value == 0 and anon.connected().value == 135
    nurse.subscribe(f"cryid/{ROOM}/cmd/result", f"cryid/{ROOM}/status")
    daemon = PipedDaemon(settings)
    path = state / settings.registry.filename
    try:
        nurse.wait(lambda: (f"cryid/{ROOM}/status", b"online") in nurse.messages, "the daemon online")

        def ask(who: Client, verb: str, doc: dict[str, object]) -> dict[str, object] | None:
            """Publish a command as ``who``: the daemon's answer, or None if the broker refused it."""
            rid = uuid.uuid4().hex
            body = json.dumps({"request_id": rid, **doc})
            if who.publish(f"cryid/{ROOM}/cmd/{verb}", body).is_failure:
                return None
            key = rid if len(body) <= MAX_COMMAND_BYTES else None  # an oversized payload is not read

            def answers() -> list[dict[str, object]]:
                docs = [json.loads(p) for t, p in nurse.messages if t.endswith("/cmd/result")]
                return [d for d in docs if d["request_id"] == key]

            nurse.wait(lambda: bool(answers()), "an answer")
            return answers()[-1]

        before = registry_dump(path)
        assert ask(dash, "confirm", {"episode_id": ep_a, "baby_id": a}) is None  # PUBACK 135
        anon_pub = anon.c.publish(f"cryid/{ROOM}/cmd/confirm", "{}", qos=1)
        assert anon_pub.rc != 0  # never connected: nothing can be sent
        bad = [
            ("confirm", {"episode_id": ep_nicu, "baby_id": a}, "heard in room 'nicu'"),
            ("confirm", {"episode_id": str(uuid.uuid4()), "baby_id": a}, "not in the registry"),
            ("confirm", {"episode_id": ep_a, "baby_id": "nobody"}, "not enrolled"),
            ("confirm", {"episode_id": ep_a, "baby_id": a, "n": 1}, "malformed"),
            ("confirm", {"episode_id": ep_a, "baby_id": a, "by": "x" * 5000}, "byte limit"),
        ]
        for verb, doc, expect in bad:
            got = ask(nurse, verb, doc)
            assert got is not None and got["ok"] is False and expect in str(got["error"]), (doc, got)
        assert registry_dump(path) == before
        ok = ask(nurse, "confirm", {"episode_id": ep_a, "baby_id": a, "by": "Nurse Joy"})
        assert ok is not None and ok["ok"] is True and ok["baby_id"] == a, ok
        dup = ask(nurse, "confirm", {"episode_id": ep_a, "baby_id": a})
        assert dup is not None and dup["ok"] is False and "already confirmed" in str(dup["error"])
        rej = ask(nurse, "reject", {"episode_id": ep_b})
        assert rej is not None and rej["ok"] is True and rej["baby_id"] == b, rej
        undo = ask(nurse, "undo", {"confirmation_id": rej["confirmation_id"]})
        assert undo is not None and undo["ok"] is True and undo["confirmation_id"] == rej["confirmation_id"]
    finally:
        code = daemon.stop()
    assert code == 0
    with Registry.open(state) as reg:
        got = [(f.kind, f.baby_id, f.created_by, f.via, f.live) for f in reg.feedback()]
    assert got == [("confirm", a, "Nurse Joy", "mqtt", True), ("reject", b, "nurse", "mqtt", False)]


def test_the_broker_drops_oversized_packets(client: Callable[..., Client]) -> None:
    """mosquitto.conf's max_packet_size: a 70 kB command never reaches the daemon user; the sender is
    disconnected (MQTT 5: reason 149, packet too large) and a normal command still goes through."""
    daemon = client(DAEMON_USER)
    assert daemon.connected().value == 0
    daemon.subscribe(f"cryid/{ROOM}/cmd/#")
    big = client("nurse")
    assert big.connected().value == 0
    gone = threading.Event()
    big.c.on_disconnect = lambda _c, _u, _f, rc, _p: gone.set()
    big.c.publish(f"cryid/{ROOM}/cmd/confirm", "x" * 70_000, qos=1)
    assert gone.wait(10), "the broker kept a client that sent a 70 kB packet"
    nurse = client("nurse")
    assert nurse.connected().value == 0
    assert nurse.publish(f"cryid/{ROOM}/cmd/confirm", "small").value == 0
    daemon.wait(lambda: len(daemon.messages) >= 1, "the small command")
    assert daemon.messages == [(f"cryid/{ROOM}/cmd/confirm", b"small")]
