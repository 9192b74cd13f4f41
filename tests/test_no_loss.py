"""No identification is lost: an event leaves the outbox only when the broker acknowledges it.

The daemon publishes to a broker that takes every PUBLISH and never answers with PUBACK
(``tests/fixtures/silent_broker.py``: no real broker can be made to withhold PUBACK). Every event it
sent must still be in the outbox when the daemon stops; after a restart against a real mosquitto the
same events (same ``event_id``) are delivered and only then leave the outbox.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf

from cryid.daemon import nursery
from cryid.daemon.config import MqttSettings, ServiceSettings, Settings
from cryid.daemon.service import build_service
from tests.fixtures.broker import Broker, Subscriber
from tests.fixtures.silent_broker import SilentBroker

SR = 16000


def _outbox(state: Path) -> list[str]:
    db = sqlite3.connect(f"file:{state / 'outbox.sqlite3'}?mode=ro", uri=True)
    try:
        return [str(r[0]) for r in db.execute("SELECT event_id FROM events ORDER BY seq")]
    finally:
        db.close()


def _settings(state: Path, model: Path, host: str, port: int, shutdown_timeout_s: float) -> Settings:
    return Settings(
        room="ward1",
        state_dir=state,
        model=model,
        mqtt=MqttSettings(host=host, port=port, reconnect_min_s=0.2, reconnect_max_s=1.0),
        service=ServiceSettings(shutdown_timeout_s=shutdown_timeout_s),
    )


def test_events_sent_but_not_acknowledged_stay_and_are_delivered_after_a_restart(
    shipped_model_dir: Path,
    silent_broker: SilentBroker,
    mosquitto: Broker,
    subscriber_factory: Callable[..., Subscriber],
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    voice = nursery.voices(2, seed=1)[0]
    rng = np.random.default_rng(4)
    cry = tmp_path / "cry.wav"
    sf.write(cry, np.concatenate([nursery.room_noise(1.0, rng), nursery.bout(voice, 3.0, seed=9)]), SR)

    # 1. The broker takes the events and stays silent; the daemon stops after 2 s of waiting for PUBACKs.
    service = build_service(
        _settings(state, shipped_model_dir, silent_broker.host, silent_broker.port, 2.0), str(cry)
    )
    try:
        assert service.run() == 0
    finally:
        service.close()
    sent = [p for p in silent_broker.received("cryid/ward1/") if "/baby/" in p.topic or "/unknown" in p.topic]
    assert sent, "the daemon published no event to the silent broker"
    assert all(p.qos == 1 for p in sent)
    sent_ids = {json.loads(p.payload)["event_id"] for p in sent}
    stored = _outbox(state)
    assert sent_ids <= set(stored), "events were removed from the outbox without a PUBACK"
    assert len(stored) == len(set(stored)) >= 2

    # 2. A restart against a real broker delivers exactly those events; then the outbox is empty.
    sub = subscriber_factory(mosquitto, "cryid/ward1/#")
    quiet = tmp_path / "quiet.wav"
    sf.write(quiet, nursery.room_noise(2.0, np.random.default_rng(0)), SR)
    service = build_service(
        _settings(state, shipped_model_dir, mosquitto.host, mosquitto.port, 30.0), str(quiet)
    )
    try:
        assert service.run() == 0
    finally:
        service.close()
    sub.wait_for(lambda m: set(stored) <= {e["event_id"] for e in sub.events()}, timeout_s=30)
    assert {e["event_id"] for e in sub.events()} == set(stored)
    assert _outbox(state) == []
