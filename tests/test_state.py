"""Retained dashboard state: the stage on a real registry, and the daemon publishing it to mosquitto.

The stage tests feed :class:`RoomState` real :class:`CryEvent` payloads and a real SQLite registry
(infants inserted, discharged and purged through ``cryid.enrollment``). The service test runs the
daemon on generated cries with the seeded fixture model (as tests/test_service.py does) and reads the
retained topics back with a fresh subscriber, as a dashboard opened later would.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import soundfile as sf

from cryid.daemon import nursery
from cryid.daemon.config import IdentifierSettings, MqttSettings, ServiceSettings, Settings
from cryid.daemon.events import BabyState, CandidateOut, CryEvent, Roster
from cryid.daemon.service import build_service
from cryid.daemon.state import RoomState
from cryid.enrollment import enroll
from cryid.enrollment.registry import Registry
from cryid.models.embedder import Embedder
from tests.fixtures.broker import Broker, Subscriber
from tests.fixtures.registry import tamper

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`

T0 = datetime(2026, 5, 1, 8, 0, tzinfo=timezone.utc)
P = "cryid/ward1"


def _event(kind: str, baby: str | None, episode: str, start: datetime, dur_s: float = 2.0) -> CryEvent:
    return CryEvent(
        event_id=str(uuid.uuid4()),
        episode_id=episode,
        kind=kind,  # type: ignore[arg-type]
        decision="identified" if baby else "unknown",
        baby_id=baby,
        best_baby_id=baby or "ada",
        score=0.8,
        runner_up=None,
        margin=0.8,
        confidence=0.9 if baby else None,
        candidates=[CandidateOut(baby_id=baby or "ada", score=0.8, probability=0.9 if baby else None)],
        n_candidates=2,
        started_at=start,
        ended_at=start + timedelta(seconds=dur_s),
        stream_offset_s=1.0,
        duration_s=dur_s,
        n_expirations=1,
        level_dbfs=-20.0,
        model_sha256="0" * 64,
        room="ward1",
    )


def _registry(tmp_path: Path, *infants: tuple[str, str, str]) -> Registry:
    registry = Registry.open(tmp_path / "state")
    with registry.write() as tx:
        for baby, name, room in infants:
            tx.insert_infant(baby, name, room)
    return registry


def _by_topic(msgs: list) -> dict[str, str]:
    return {m.topic: m.payload for m in msgs}


def test_roster_lists_the_rooms_active_babies_and_their_state(tmp_path: Path) -> None:
    reg = _registry(tmp_path, ("ada", "Ada L.", "ward1"), ("ben", "", "ward1"), ("zoe", "Zoe", "ward2"))
    st = RoomState(P, "ward1", crying_timeout_s=30)
    out = _by_topic(st.roster(reg.infants(), T0))
    assert set(out) == {f"{P}/babies", f"{P}/baby/ada/state", f"{P}/baby/ben/state"}
    roster = Roster.model_validate_json(out[f"{P}/babies"])
    assert [(b.baby_id, b.display_name) for b in roster.babies] == [("ada", "Ada L."), ("ben", None)]
    assert roster.babies[0].enrolled_at.tzinfo is not None
    ada = BabyState.model_validate_json(out[f"{P}/baby/ada/state"])
    assert (ada.crying, ada.last_cry_at, ada.episodes_24h, ada.cry_minutes_24h) == (False, None, 0, 0.0)
    assert st.roster(reg.infants(), T0 + timedelta(seconds=5)) == []  # nothing changed: nothing sent
    reg.close()


def test_crying_from_the_first_cry_to_the_final_episode(tmp_path: Path) -> None:
    reg = _registry(tmp_path, ("ada", "", "ward1"), ("ben", "", "ward1"))
    st = RoomState(P, "ward1", crying_timeout_s=30)
    st.roster(reg.infants(), T0)
    ep = str(uuid.uuid4())
    out = _by_topic(st.observe(_event("expiration", "ada", ep, T0), T0))
    ada = BabyState.model_validate_json(out[f"{P}/baby/ada/state"])
    assert ada.crying and ada.crying_since == T0 and ada.episode_id == ep
    assert list(out) == [f"{P}/baby/ada/state"]  # ben unchanged
    assert st.observe(_event("expiration", "ada", ep, T0 + timedelta(seconds=3)), T0) != []  # last cry moves
    assert st.baby_state("ada", T0).crying_since == T0  # same episode: same start
    out = _by_topic(st.observe(_event("episode", "ada", ep, T0, dur_s=90.0), T0 + timedelta(seconds=91)))
    ada = BabyState.model_validate_json(out[f"{P}/baby/ada/state"])
    assert not ada.crying and ada.crying_since is None
    assert ada.last_cry_at == T0 + timedelta(seconds=90)
    assert (ada.episodes_24h, ada.cry_minutes_24h) == (1, 1.5)
    # the 24 h window slides
    assert st.tick(T0 + timedelta(hours=23)) == []
    later = _by_topic(st.tick(T0 + timedelta(hours=24, minutes=2)))
    assert BabyState.model_validate_json(later[f"{P}/baby/ada/state"]).episodes_24h == 0
    reg.close()


def test_final_decision_overrides_the_provisional_one(tmp_path: Path) -> None:
    reg = _registry(tmp_path, ("ada", "", "ward1"), ("ben", "", "ward1"))
    st = RoomState(P, "ward1", crying_timeout_s=30)
    st.roster(reg.infants(), T0)
    ep = str(uuid.uuid4())
    st.observe(_event("expiration", "ada", ep, T0), T0)
    out = _by_topic(st.observe(_event("episode", "ben", ep, T0), T0))
    ada = BabyState.model_validate_json(out[f"{P}/baby/ada/state"])
    ben = BabyState.model_validate_json(out[f"{P}/baby/ben/state"])
    assert not ada.crying and ada.episodes_24h == 0
    assert not ben.crying and ben.episodes_24h == 1
    # an unknown final decision ends the crying too
    ep2 = str(uuid.uuid4())
    st.observe(_event("expiration", "ada", ep2, T0 + timedelta(minutes=1)), T0)
    out = _by_topic(st.observe(_event("episode", None, ep2, T0 + timedelta(minutes=1)), T0))
    assert not BabyState.model_validate_json(out[f"{P}/baby/ada/state"]).crying
    reg.close()


def test_crying_times_out_and_stops_with_the_daemon(tmp_path: Path) -> None:
    reg = _registry(tmp_path, ("ada", "", "ward1"))
    st = RoomState(P, "ward1", crying_timeout_s=30)
    st.roster(reg.infants(), T0)
    st.observe(_event("expiration", "ada", "e1", T0), T0)
    assert st.tick(T0 + timedelta(seconds=29)) == []
    out = _by_topic(st.tick(T0 + timedelta(seconds=31)))
    assert not BabyState.model_validate_json(out[f"{P}/baby/ada/state"]).crying
    st.observe(_event("expiration", "ada", "e2", T0), T0 + timedelta(seconds=40))
    out = _by_topic(st.stop(T0 + timedelta(seconds=41)))
    assert not BabyState.model_validate_json(out[f"{P}/baby/ada/state"]).crying
    reg.close()


def test_discharged_and_purged_babies_are_cleared(tmp_path: Path) -> None:
    reg = _registry(tmp_path, ("ada", "", "ward1"), ("ben", "", "ward1"), ("cy", "", "ward1"))
    with reg.write() as tx:
        tx.insert_infant("old", "", "ward1", status="discharged")
    st = RoomState(P, "ward1", crying_timeout_s=30)
    out = st.roster(reg.infants(), T0)
    assert ("cryid/ward1/baby/old/state", "") in [(m.topic, m.payload) for m in out]  # left by a past run
    enroll.remove(reg, "ben")  # discharge
    enroll.remove(reg, "cy", purge=True)
    out = _by_topic(st.roster(reg.infants(), T0))
    assert out[f"{P}/baby/ben/state"] == "" and out[f"{P}/baby/cy/state"] == ""
    assert [b.baby_id for b in Roster.model_validate_json(out[f"{P}/babies"]).babies] == ["ada"]
    assert f"{P}/baby/old/state" not in out  # cleared once is enough
    assert st.observe(_event("episode", "ben", "e3", T0), T0) == []  # no state for a discharged baby
    # after a (re)connect: everything again, the clears too (those found before the broker answered
    # were dropped: the daemon publishes retained state only while connected)
    snap = _by_topic(st.snapshot(T0))
    gone = {f"{P}/baby/{b}/state" for b in ("ben", "cy", "old")}
    assert set(snap) == {f"{P}/babies", f"{P}/baby/ada/state", f"{P}/pending"} | gone  # pending: empty
    assert all(snap[t] == "" for t in gone)
    reg.close()


def test_last_cries_and_totals_survive_a_restart(tmp_path: Path) -> None:
    reg = _registry(tmp_path, ("ada", "", "ward1"), ("ben", "", "ward1"))
    st = RoomState(P, "ward1", crying_timeout_s=30)
    st.roster(reg.infants(), T0)
    st.observe(_event("episode", "ada", "e1", T0 - timedelta(hours=25), dur_s=60.0), T0)  # out of the window
    st.observe(_event("episode", "ada", "e2", T0, dur_s=90.0), T0)
    st.observe(_event("expiration", "ben", "e3", T0), T0)  # crying now: not carried over a restart
    path = tmp_path / "dashboard-state.json"
    st.save(path, T0)
    again = RoomState(P, "ward1", crying_timeout_s=30)
    again.load(path, T0 + timedelta(minutes=1))
    out = _by_topic(again.roster(reg.infants(), T0 + timedelta(minutes=1)))
    ada = BabyState.model_validate_json(out[f"{P}/baby/ada/state"])
    ben = BabyState.model_validate_json(out[f"{P}/baby/ben/state"])
    assert (ada.episodes_24h, ada.cry_minutes_24h, ada.episode_id) == (1, 1.5, "e2")
    assert ada.last_cry_at == T0 + timedelta(seconds=90)
    assert not ben.crying and ben.last_cry_at == T0 + timedelta(seconds=2)
    # another room's file, a damaged file, no file: nothing is taken, nothing fails
    other = RoomState("cryid/ward2", "ward2", crying_timeout_s=30)
    other.load(path, T0)
    assert other.baby_state("ada", T0).episodes_24h == 0
    path.write_text("{not json")
    RoomState(P, "ward1", crying_timeout_s=30).load(path, T0)
    RoomState(P, "ward1", crying_timeout_s=30).load(tmp_path / "none.json", T0)
    reg.close()


def test_bad_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="crying_timeout_s"):
        RoomState(P, "ward1", crying_timeout_s=0)


# ------------------------------------------------------------------------------- the daemon
THRESHOLDS = {"min_score": 0.975, "min_margin": 0.02}  # tests/test_service.py's fixture-model scale


def _retained(broker: Broker, factory: Callable[..., Subscriber], want: set[str]) -> dict[str, bytes]:
    """What a dashboard opening now gets: the retained messages under cryid/ward1/# (``want`` at least)."""
    sub = factory(broker, "cryid/ward1/#")
    sub.wait_for(lambda m: want <= {x.topic for x in m}, timeout_s=10)
    time.sleep(1.0)  # the rest of the retained messages
    return {m.topic: m.payload for m in sub.messages if m.retain}


def test_daemon_publishes_retained_state_and_clears_a_discharged_baby(
    onnx_model_dir: Path,
    mosquitto: Broker,
    subscriber_factory: Callable[..., Subscriber],
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    settings = Settings(
        room="ward1",
        state_dir=state,
        model=onnx_model_dir,
        mqtt=MqttSettings(host=mosquitto.host, port=mosquitto.port, reconnect_min_s=0.2),
        identifier=IdentifierSettings(**THRESHOLDS),
        service=ServiceSettings(shutdown_timeout_s=30.0),
    )
    voices = nursery.voices(2, seed=1)
    embedder = Embedder(onnx_model_dir)
    with Registry.open(state, settings.registry) as registry:
        for i, baby in enumerate(["ada", "ben"]):
            bout = nursery.bout(voices[i], 6, seed=100 + i)
            nursery.enroll(registry, embedder, settings, baby, [bout], "ward1")
        tamper(registry.path, "UPDATE infants SET display_name = 'Ada L.' WHERE baby_id = 'ada'")
    wav, _ = nursery.nursery_stream([("ada", nursery.bout(voices[0], 3.0, seed=200))], gap_s=6.0, seed=5)
    sf.write(tmp_path / "stream.wav", wav, 16000)

    service = build_service(settings, str(tmp_path / "stream.wav"))
    try:
        assert service.run() == 0
    finally:
        service.close()
    got = _retained(mosquitto, subscriber_factory, {f"{P}/babies", f"{P}/baby/ada/state", f"{P}/status"})
    roster = Roster.model_validate_json(got["cryid/ward1/babies"])
    assert [(b.baby_id, b.display_name) for b in roster.babies] == [("ada", "Ada L."), ("ben", None)]
    ada = BabyState.model_validate_json(got["cryid/ward1/baby/ada/state"])
    ben = BabyState.model_validate_json(got["cryid/ward1/baby/ben/state"])
    print("ada:", ada.model_dump_json())
    assert not ada.crying and ada.last_cry_at is not None and ada.episodes_24h == 1
    assert ada.cry_minutes_24h > 0
    assert ben.episodes_24h == 0 and ben.last_cry_at is None
    assert got["cryid/ward1/status"] == b"offline"

    with Registry.open(state, settings.registry) as registry:
        enroll.remove(registry, "ben")
    service = build_service(settings, str(tmp_path / "stream.wav"))
    try:
        assert service.run() == 0
    finally:
        service.close()
    got = _retained(mosquitto, subscriber_factory, {f"{P}/babies", f"{P}/baby/ada/state"})
    assert "cryid/ward1/baby/ben/state" not in got  # the empty retained message deleted it
    assert [b.baby_id for b in Roster.model_validate_json(got["cryid/ward1/babies"]).babies] == ["ada"]
    # the 24 h totals go on across the restart (dashboard-state.json): the second run heard ada again
    assert BabyState.model_validate_json(got["cryid/ward1/baby/ada/state"]).episodes_24h == 2
    assert (state / "dashboard-state.json").is_file()


def test_pending_lists_the_latest_unnamed_episodes_for_a_page_opened_later() -> None:
    """Final ``unknown`` episodes go into the retained ``<prefix>/pending`` list, newest first, at most
    PENDING_MAX of them and none older than 24 h; provisional events and named episodes do not; an unchanged
    list is not republished; a reconnect's snapshot carries it."""
    from cryid.daemon.events import PendingCries
    from cryid.daemon.state import PENDING_MAX

    st = RoomState("cryid/ward1", "ward1", crying_timeout_s=30)
    t0 = datetime(2026, 12, 7, 8, 0, tzinfo=timezone.utc)
    st.roster([], t0)

    def unknown(i: int, kind: str = "episode", baby: str | None = None) -> CryEvent:
        return _event(kind, baby, f"e{i}", t0 + timedelta(minutes=i))

    def pending(msgs: list) -> list[str] | None:
        got = [m for m in msgs if m.topic == "cryid/ward1/pending"]
        if not got:
            return None
        return [e.episode_id for e in PendingCries.model_validate_json(got[-1].payload).episodes]

    assert pending(st.observe(unknown(1, kind="expiration"), t0)) is None  # provisional: not listed
    assert pending(st.observe(unknown(1), t0)) == ["e1"]
    assert pending(st.observe(unknown(2, baby="x"), t0)) is None  # named: not listed
    for i in range(2, PENDING_MAX + 3):
        out = st.observe(unknown(i), t0 + timedelta(minutes=i))
    newest = [f"e{i}" for i in range(PENDING_MAX + 2, 2, -1)]
    assert pending(out) == newest  # newest first, at most PENDING_MAX
    assert pending(st.tick(t0 + timedelta(minutes=30))) is None  # unchanged: nothing republished
    assert pending(st.snapshot(t0 + timedelta(minutes=30))) == newest
    late = t0 + timedelta(hours=24, minutes=PENDING_MAX + 1, seconds=30)
    assert pending(st.tick(late)) == [f"e{PENDING_MAX + 2}"]  # the others ended over 24 h ago


def test_pending_follows_the_nurses_answers_kept_in_the_registry(tmp_path: Path) -> None:
    """The pending list against a real registry (``read_waiting``, what the daemon reads at start and after
    every registry change): a restart lists the room's unanswered unnamed episodes of the last 24 h, not an
    old, named, other room's or unreadable one; a confirmation or rejection takes one off, an undo puts it
    back in its place; an answer the registry holds before the event is observed keeps it off; an episode
    heard but not kept stays; at most PENDING_MAX, newest first."""
    import numpy as np

    from cryid.daemon.events import PendingCries
    from cryid.daemon.roomfeed import read_waiting
    from cryid.daemon.state import PENDING_MAX
    from cryid.enrollment import feedback
    from cryid.enrollment.config import RegistrySettings
    from cryid.enrollment.episodes import NewEpisode
    from tests.fixtures.ward import final_event, keep_event

    reg = _registry(tmp_path, ("ada", "", "ward1"), ("ben", "", "ward1"))
    vectors = np.random.default_rng(3).normal(size=(2, 192)).astype(np.float32)  # numbers, as kept
    now = datetime.now(timezone.utc)
    rs = RegistrySettings()

    def ago(minutes: float) -> datetime:
        return now - timedelta(minutes=minutes)

    def kept(ev: CryEvent) -> CryEvent:
        keep_event(reg, ev, vectors)
        return ev

    st = RoomState(P, "ward1", crying_timeout_s=30)  # a restarted daemon: nothing in memory
    e3, e1, e2 = (kept(final_event("ward1", ago(m))) for m in (50, 20, 10))
    kept(final_event("ward1", now - timedelta(hours=24, minutes=1)))  # over 24 h ago
    kept(final_event("ward1", ago(5), named="ada"))  # named: nothing to answer
    kept(final_event("ward2", ago(5)))  # another room's
    bad = final_event("ward1", ago(4))
    feedback.keep_episode(
        reg, NewEpisode(bad.episode_id, "ward1", bad.started_at, bad.ended_at, "0" * 64, "unknown", None,
                        "ada", "{not json", vectors), rs, now=now,
    )  # fmt: skip

    def sync() -> list[str] | None:
        out = st.waiting(*read_waiting(reg, "ward1", now), now)
        got = [m for m in out if m.topic == f"{P}/pending"]
        if not got:
            return None
        return [e.episode_id for e in PendingCries.model_validate_json(got[-1].payload).episodes]

    assert sync() == [e2.episode_id, e1.episode_id, e3.episode_id]  # restored, newest first
    assert sync() is None  # unchanged: not republished
    c1 = feedback.confirm(reg, e1.episode_id, "ada", rs, by="Nurse Joy", now=now)
    assert sync() == [e2.episode_id, e3.episode_id]
    feedback.reject(reg, e2.episode_id, "ben", rs, by="Nurse Joy", via="mqtt", now=now)
    assert sync() == [e3.episode_id]
    feedback.undo(reg, c1.confirmation_id, by="Nurse Joy", now=now)
    assert sync() == [e1.episode_id, e3.episode_id]  # back in its place

    # answered before the daemon's own event reached the stage: it is not listed
    e4 = kept(final_event("ward1", ago(2)))
    feedback.confirm(reg, e4.episode_id, "ben", rs, by="Nurse Joy", now=now)
    assert sync() is None  # answered before it was listed: the list is as it was
    assert not [m for m in st.observe(e4, now) if m.topic == f"{P}/pending"]
    # heard but not kept (the registry failed to keep it): listed, and it stays across registry changes
    e5 = final_event("ward1", ago(1))
    assert any(m.topic == f"{P}/pending" for m in st.observe(e5, now))
    assert sync() is None
    # more cries waiting than the list holds: the newest PENDING_MAX
    more = [kept(final_event("ward1", ago(30 + i))).episode_id for i in range(PENDING_MAX)]
    assert sync() == [e5.episode_id, e1.episode_id, *more[: PENDING_MAX - 2]]
