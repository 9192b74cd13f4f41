"""Many wards, one central broker: deploy/mosquitto/bridge.conf between two real mosquittos.

The ward broker runs the template with test values (TLS to the central broker with a throw-away CA,
the ward's own user and password, ``cleansession false``); a real cryid daemon publishes to the ward
broker. The central broker is stopped for 20 s in the middle while the daemon keeps publishing: every
event still reaches the central subscriber, and duplicates (at-least-once) are recognised by event_id.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from cryid.daemon import nursery
from cryid.daemon.config import MqttSettings, ServiceSettings, Settings
from tests.fixtures.broker import Broker, Subscriber, free_port
from tests.test_homeassistant import Daemon
from tests.test_metrics_http import model_dir, s16, wait
from tests.test_mosquitto_acl import make_certificates

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "deploy" / "mosquitto" / "bridge.conf"
WARD, ROOM = "w1", "nicu-1"
OUTAGE_S = 20.0


def render_bridge(central_tls_port: int, ca: Path, password: str) -> str:
    values = {
        "@WARD@": WARD,
        "@ROOM@": ROOM,
        "@CENTRAL_HOST@": "localhost",  # the name in the broker certificate
        "@CENTRAL_PORT@": str(central_tls_port),
        "@PASSWORD@": password,
        "@CA_FILE@": str(ca),
    }
    text = TEMPLATE.read_text()
    for k, v in values.items():
        text = text.replace(k, v)
    settings = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert not [line for line in settings if "@" in line], "a placeholder of bridge.conf was not replaced"
    return text


@pytest.fixture()
def brokers(tmp_path: Path) -> Iterator[tuple[Broker, Broker]]:
    """(ward, central): central has a plain listener for the test subscriber and TLS for bridges."""
    certs = tmp_path / "certs"
    certs.mkdir()
    make_certificates(certs)
    (tmp_path / "central").mkdir()
    central = Broker(tmp_path / "central", users={f"cryid-ward-{WARD}": "ward-pw", "reader": "reader-pw"})
    tls_port = free_port()
    acl = tmp_path / "central.acl"
    acl.write_text(f"user cryid-ward-{WARD}\ntopic write cryid/{ROOM}/#\nuser reader\ntopic read cryid/#\n")
    with central.conf.open("a") as f:
        f.write(f"acl_file {acl}\nlistener {tls_port} 127.0.0.1\ncafile {certs / 'ca.crt'}\n")
        f.write(f"certfile {certs / 'broker.crt'}\nkeyfile {certs / 'broker.key'}\ntls_version tlsv1.2\n")
    (tmp_path / "ward").mkdir()
    ward = Broker(tmp_path / "ward")
    with ward.conf.open("a") as f:
        f.write(render_bridge(tls_port, certs / "ca.crt", "ward-pw"))
    central.start()
    ward.start()
    yield ward, central
    ward.stop()
    central.stop()


def test_ward_events_reach_the_central_broker_across_a_20_s_outage(
    brokers: tuple[Broker, Broker],
    subscriber_factory: Callable[..., Subscriber],
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    ward, central = brokers
    at_ward = subscriber_factory(ward, "cryid/#")
    at_central = subscriber_factory(central, "cryid/#", username="reader", password="reader-pw")
    settings = Settings(
        room=ROOM,
        state_dir=tmp_path / "state",
        model=model_dir(request),
        mqtt=MqttSettings(host=ward.host, port=ward.port, reconnect_min_s=0.2, reconnect_max_s=1.0),
        service=ServiceSettings(shutdown_timeout_s=10.0),
    )
    daemon = Daemon(settings)
    try:
        # over the bridge (TLS, the ward's own user): the retained availability arrives centrally
        wait(lambda: any(m.topic == f"cryid/{ROOM}/status" for m in at_central.messages), "bridged status")
        voices = nursery.voices(4, seed=11)
        rng = np.random.default_rng(0)

        def play(i: int) -> None:
            bout = nursery.bout(voices[i], 2.5, seed=300 + i)
            daemon.writer.write(s16(np.concatenate([bout, nursery.room_noise(9.0, rng)])))

        def episodes(sub: Subscriber) -> int:
            return sum(e["kind"] == "episode" for e in sub.events())

        play(0)
        wait(lambda: episodes(at_central) == 1, "the first episode at the central broker")

        central.stop()
        down_at = time.monotonic()
        before = {e["event_id"] for e in at_ward.events()}
        for i in (1, 2):  # two episodes while the central broker is down
            play(i)
        wait(lambda: episodes(at_ward) == 3, "two more episodes at the ward broker", timeout_s=OUTAGE_S)
        during = {e["event_id"] for e in at_ward.events()} - before  # queued by the ward broker
        assert episodes(at_central) == 1  # really down: nothing crossed the bridge meanwhile
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
        central.start()

        play(3)  # and one after it came back
        ward_ids = lambda: {e["event_id"] for e in at_ward.events()}  # noqa: E731
        wait(lambda: episodes(at_ward) == 4, "the last episode at the ward broker")
        wait(lambda: ward_ids() <= {e["event_id"] for e in at_central.events()}, "every event centrally",
             timeout_s=90)  # fmt: skip
    finally:
        code = daemon.stop()
    assert code == 0
    central_events = at_central.events()
    assert len(during) >= 4 and during <= {e["event_id"] for e in central_events}
    assert {e["event_id"] for e in central_events} == {e["event_id"] for e in at_ward.events()}
    raw = Counter(
        json.loads(m.payload)["event_id"]
        for m in at_central.messages
        if "/unknown" in m.topic or "/baby/" in m.topic
    )
    dupes = sum(n - 1 for n in raw.values())
    print(f"central: {len(raw)} events, {dupes} duplicate deliveries recognised by event_id")
    assert all(e["room"] == ROOM for e in central_events)
