"""The retained ``<prefix>/pending`` list follows the nurses: the running daemon takes an answered cry off
it (a command over MQTT it handles itself, or ``cryid enroll confirm|reject`` in another process that it
sees through the registry's ``data_version``), an undo puts it back, and a restarted daemon rebuilds it
from the episodes the registry keeps.

Real parts: the shipped ONNX model, real dev cries (babies enrolled from B recordings, the daemon hears
D recordings through a pipe), real SQLite, a real mosquitto, ``cryid`` in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cryid.daemon.config import IdentifierSettings, MqttSettings, Settings
from cryid.daemon.events import PendingCries
from cryid.daemon.nursery import room_noise
from cryid.enrollment import feedback
from cryid.enrollment.config import RegistrySettings
from cryid.enrollment.registry import Registry
from cryid.models.audio import load_audio
from cryid.models.config import DEFAULT_MODEL_DIR
from cryid.models.embedder import Embedder
from tests.fixtures.broker import Broker, Received, Subscriber
from tests.fixtures.cli import cryid_env
from tests.fixtures.ward import PipedDaemon, embed_audio, enroll_room, files, final_event, keep_event

pytestmark = pytest.mark.slow  # starts mosquitto and subprocesses: not in `pytest -m "not slow"`

ROOM = "nursery"
PENDING = f"cryid/{ROOM}/pending"


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(DEFAULT_MODEL_DIR)


@pytest.fixture
def ward_state(tmp_path: Path, embedder: Embedder, dac_dir: Path) -> tuple[Path, list[str]]:
    """A registry of 8 dev babies of room nursery, enrolled from their B recordings; no cry confirmed yet."""
    state = tmp_path / "state"
    with Registry.open(state) as reg:
        babies = enroll_room(reg, embedder, dac_dir, ROOM)
    return state, babies


def _settings(state: Path, broker: Broker) -> Settings:
    return Settings(
        room=ROOM, state_dir=state, model=DEFAULT_MODEL_DIR,
        mqtt=MqttSettings(host=broker.host, port=broker.port, reconnect_min_s=0.2),
        identifier=IdentifierSettings(episode_gap_s=5.0),
    )  # fmt: skip


def _listed(msgs: list[Received]) -> list[str] | None:
    """Episode ids of the last pending list received (None: none yet)."""
    got = [m for m in msgs if m.topic == PENDING and m.payload]
    if not got:
        return None
    return [e.episode_id for e in PendingCries.model_validate_json(got[-1].payload).episodes]


def _wait_listed(sub: Subscriber, want: list[str], timeout_s: float = 10.0) -> float:
    """Wait until the last pending list is ``want``; returns the seconds it took."""
    t0 = time.monotonic()
    try:
        sub.wait_for(lambda msgs: _listed(msgs) == want, timeout_s=timeout_s)
    except TimeoutError:
        raise AssertionError(f"pending list {_listed(sub.messages)}, expected {want}") from None
    return time.monotonic() - t0


class Nurse:
    """Answers cries as a nurse does: ``cmd/<verb>`` over MQTT (the dashboard's way) or ``cryid enroll
    confirm|reject|undo`` in another process; each returns the confirmation id."""

    def __init__(self, via: str, broker: Broker, sub: Subscriber, state: Path) -> None:
        self.via, self.broker, self.sub, self.state = via, broker, sub, state

    def confirm(self, episode_id: str, baby_id: str) -> int:
        return self._answer("confirm", {"episode_id": episode_id, "baby_id": baby_id})

    def reject(self, episode_id: str, baby_id: str) -> int:
        return self._answer("reject", {"episode_id": episode_id, "baby_id": baby_id})

    def undo(self, confirmation_id: int) -> int:
        return self._answer("undo", {"confirmation_id": confirmation_id})

    def _answer(self, verb: str, doc: dict[str, Any]) -> int:
        if self.via == "cli":
            env = cryid_env() | {"CRYID_STATE_DIR": str(self.state), "CRYID_MODEL": str(DEFAULT_MODEL_DIR)}
            args = [str(v) for v in doc.values()]
            done = subprocess.run(
                [sys.executable, "-m", "cryid.daemon.cli", "enroll", verb, *args, "--by", "Nurse Joy"],
                env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            print(done.stdout.strip())
            return int(doc["confirmation_id"]) if verb == "undo" else int(done.stdout.split()[1].rstrip(":"))
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"nurse-{uuid.uuid4().hex[:6]}")
        client.connect(self.broker.host, self.broker.port)
        client.loop_start()
        try:
            rid = uuid.uuid4().hex
            payload = json.dumps({"request_id": rid, "by": "Nurse Joy", **doc})
            client.publish(f"cryid/{ROOM}/cmd/{verb}", payload, qos=1).wait_for_publish(10)

            def answers(msgs: list[Received]) -> list[dict[str, Any]]:
                docs = [m.json() for m in msgs if m.topic == f"cryid/{ROOM}/cmd/result"]
                return [d for d in docs if d["request_id"] == rid]

            answer = answers(self.sub.wait_for(lambda msgs: bool(answers(msgs)), timeout_s=30))[0]
        finally:
            client.disconnect()
            client.loop_stop()
        assert answer["ok"], answer
        return int(answer["confirmation_id"])


def _clear_retained(broker: Broker, topic: str) -> None:
    """Delete the broker's retained copy (an empty retained message), so only a new daemon can fill it."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"clear-{uuid.uuid4().hex[:6]}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.parametrize("via", ["mqtt", "cli"])
def test_an_answered_cry_leaves_the_pending_list_and_an_undo_puts_it_back(
    ward_state: tuple[Path, list[str]], dac_dir: Path, mosquitto: Broker,
    subscriber_factory: Callable[..., Subscriber], via: str,
) -> None:  # fmt: skip
    """The daemon hears two real cries it cannot name yet (no confirmed cry in the room) and lists them on
    the retained pending topic; a nurse confirms the first and rejects the second (over MQTT, or with
    ``cryid enroll`` in another process while the daemon runs): each leaves the list within seconds; an
    undo of the confirmation puts that cry back; a restarted daemon lists it again, not the rejected one."""
    state, babies = ward_state
    settings = _settings(state, mosquitto)
    pad = room_noise(12.0, np.random.default_rng(7))
    cries = [load_audio(files(dac_dir, b, "D")[0]) for b in babies[:2]]
    sub = subscriber_factory(mosquitto, f"cryid/{ROOM}/#")
    nurse = Nurse(via, mosquitto, sub, state)
    daemon = PipedDaemon(settings)
    seen: set[str] = set()
    try:
        daemon.play(np.concatenate([pad, cries[0], pad]))
        first = sub.next_episode(seen)
        daemon.play(np.concatenate([cries[1], pad]))
        second = sub.next_episode(seen)
        assert first["decision"] == second["decision"] == "unknown", (first, second)
        e1, e2 = first["episode_id"], second["episode_id"]
        _wait_listed(sub, [e2, e1])

        cid = nurse.confirm(e1, babies[0])
        took = _wait_listed(sub, [e2])
        print(f"{via}: confirmed cry off the list {took:.2f} s after the answer")
        nurse.reject(e2, babies[1])
        took = _wait_listed(sub, [])
        print(f"{via}: rejected cry off the list {took:.2f} s after the answer")
        nurse.undo(cid)
        _wait_listed(sub, [e1])
    finally:
        code = daemon.stop()
    assert code == 0

    _clear_retained(mosquitto, PENDING)  # what the restarted daemon publishes, not the last run's copy
    daemon = PipedDaemon(settings)
    try:
        page = subscriber_factory(mosquitto, PENDING)  # a dashboard opened after the restart
        _wait_listed(page, [e1])
    finally:
        assert daemon.stop() == 0


def test_a_restarted_daemon_lists_the_cries_still_waiting(
    ward_state: tuple[Path, list[str]], embedder: Embedder, dac_dir: Path, mosquitto: Broker,
    subscriber_factory: Callable[..., Subscriber],
) -> None:  # fmt: skip
    """At start the daemon rebuilds the pending list from the registry's kept episodes: the room's unnamed
    final episodes of the last 24 h without a live answer (a confirmation undone counts as none), newest
    first, at most 10; not one older than 24 h, confirmed, rejected, named, or of another room."""
    state, babies = ward_state
    a, b = babies[:2]
    vectors = embed_audio(embedder, load_audio(files(dac_dir, a, "D")[0]))  # a real cry's embeddings
    now = datetime.now(timezone.utc)
    rs = RegistrySettings()
    with Registry.open(state) as reg:

        def kept(minutes_ago: float, room: str = ROOM, named: str | None = None) -> str:
            ev = final_event(
                room, now - timedelta(minutes=minutes_ago), named=named, best=a, sha256=embedder.sha256
            )
            return keep_event(reg, ev, vectors)

        waiting = [kept(5 + 5 * i) for i in range(11)]  # 5 ... 55 min ago, newest first
        confirmed, rejected, undone = kept(1), kept(2), kept(3)
        kept(24 * 60 + 1)  # over 24 h ago, never answered
        kept(1, named=a)  # named by the daemon: nothing to answer
        kept(1, room="nicu")  # another room's
        feedback.confirm(reg, confirmed, a, rs, by="Nurse Joy")
        feedback.reject(reg, rejected, b, rs, by="Nurse Joy", via="mqtt")
        feedback.undo(
            reg, feedback.confirm(reg, undone, b, rs, by="Nurse Joy").confirmation_id, by="Nurse Joy"
        )
    expected = [undone, *waiting[:9]]

    _clear_retained(mosquitto, PENDING)
    page = subscriber_factory(mosquitto, PENDING)
    daemon = PipedDaemon(_settings(state, mosquitto))
    try:
        _wait_listed(page, expected, timeout_s=30)
    finally:
        assert daemon.stop() == 0
    msg = PendingCries.model_validate_json(next(m.payload for m in page.messages if m.payload))
    assert msg.room == ROOM and all(e.kind == "episode" and e.decision == "unknown" for e in msg.episodes)
    assert msg.episodes[0].model_sha256 == embedder.sha256 and msg.episodes[0].best_baby_id == a
