"""Retained state for the ward dashboard: the room's roster and, per baby, crying now / last cry / 24 h.

A plain synchronous stage (the service calls it from its main thread only). It is fed the room's
infants from the registry (:meth:`RoomState.roster`) and every identification the daemon publishes
(:meth:`RoomState.observe`); :meth:`RoomState.tick` times out "crying now" when a baby has not been
heard for ``crying_timeout_s`` (the episode's final event normally ends it sooner) and lets the 24 h
totals slide. Each call returns the retained messages to publish, only those whose content changed:

- ``<prefix>/babies``: :class:`~cryid.daemon.events.Roster`, the room's active babies.
- ``<prefix>/baby/<id>/state``: :class:`~cryid.daemon.events.BabyState`.
- An empty payload for ``<prefix>/baby/<id>/state`` of a baby discharged, removed or moved to another
  room: an empty retained message deletes the broker's retained copy.
- ``<prefix>/pending``: :class:`~cryid.daemon.events.PendingCries`, the latest final episodes that named
  no baby and no nurse has answered yet (at most ``PENDING_MAX``, last 24 h): what a nurse may still
  confirm, for a page opened later. :meth:`RoomState.waiting` hands in the registry's view at start and
  after every registry change (a nurse's answer over MQTT or on the command line, an undo): answered
  episodes leave the list, and unanswered ones it lacks (heard before a restart, or an answer undone)
  join it in their place by end time.

Crying: a baby cries from the first provisional event that names it to the final ``episode`` event of
that episode (whoever the final decision names). The 24 h totals count final episodes attributed to
the baby, from their ``ended_at``. :meth:`RoomState.save` / :meth:`RoomState.load` keep the last cries
and the 24 h history in a small JSON file (the service: ``dashboard-state.json`` in the state
directory), so a restarted daemon goes on with the same totals; nobody is crying after a restart.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol

from cryid.daemon.events import BabyState, CryEvent, PendingCries, Roster, RosterBaby
from cryid.models.files import atomic_write

logger = logging.getLogger(__name__)

WINDOW = timedelta(hours=24)
PENDING_MAX = 10


class InfantLike(Protocol):
    """What the stage reads of a registry infant (``cryid.enrollment.registry.Infant``)."""

    baby_id: str
    display_name: str
    room: str
    status: str
    created_at: str


@dataclass(frozen=True)
class Retained:
    """One retained message to publish; an empty payload clears the topic."""

    topic: str
    payload: str


@dataclass
class _Baby:
    episode_id: str | None = None  # the episode now heard (crying) or the last one
    crying: bool = False
    crying_since: datetime | None = None
    heard_at: datetime | None = None  # wall clock when its last cry was observed (for the time-out)
    last_cry_at: datetime | None = None
    history: deque[tuple[datetime, float]] = field(default_factory=deque)  # (ended_at, duration_s)


def _parse_time(text: str) -> datetime:
    t = datetime.fromisoformat(text)
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


class RoomState:
    """Roster and per-baby state of one room, as retained MQTT messages."""

    def __init__(self, prefix: str, room: str, crying_timeout_s: float) -> None:
        if crying_timeout_s <= 0:
            raise ValueError(f"crying_timeout_s must be positive, got {crying_timeout_s}")
        self.prefix = prefix.rstrip("/")
        self.room = room
        self.timeout = timedelta(seconds=crying_timeout_s)
        self.roster_topic = f"{self.prefix}/babies"
        self._babies: dict[str, _Baby] = {}
        self._roster: dict[str, RosterBaby] = {}
        self._cleared: set[str] = set()  # babies whose state topic was cleared (or never published)
        self._sent: dict[str, str] = {}  # topic -> content last published, without its time stamp
        self.pending_topic = f"{self.prefix}/pending"
        self._pending: deque[CryEvent] = deque(maxlen=PENDING_MAX)  # newest first
        self._answered: set[str] = set()  # episodes a nurse confirmed or rejected (registry, last 24 h)

    def state_topic(self, baby_id: str) -> str:
        return f"{self.prefix}/baby/{baby_id}/state"

    # inputs ---------------------------------------------------------------------------------
    def roster(self, infants: Iterable[InfantLike], now: datetime) -> list[Retained]:
        """The registry's infants (all rooms, any status): roster, new states, cleared states."""
        infants = list(infants)
        active = {
            i.baby_id: RosterBaby(
                baby_id=i.baby_id,
                display_name=i.display_name or None,
                enrolled_at=_parse_time(i.created_at),
            )
            for i in infants
            if i.room == self.room and i.status == "active"
        }
        out: list[Retained] = []
        gone = (set(self._roster) | {i.baby_id for i in infants if i.room == self.room}) - set(active)
        for baby_id in sorted(gone - self._cleared):
            # discharged, removed, or moved away: delete the retained state (also one left by an
            # earlier run of the daemon, hence also for babies this run never published)
            self._babies.pop(baby_id, None)
            self._sent.pop(self.state_topic(baby_id), None)
            self._cleared.add(baby_id)
            out.append(Retained(self.state_topic(baby_id), ""))
        self._cleared -= set(active)
        self._roster = dict(sorted(active.items()))
        return out + self._roster_and_states(now)

    def observe(self, event: CryEvent, now: datetime) -> list[Retained]:
        """One identification the daemon published."""
        touched: set[str] = set()
        if event.kind == "episode":
            for baby_id, b in self._babies.items():
                if b.crying and b.episode_id == event.episode_id:
                    b.crying, b.crying_since = False, None  # the episode is over, whoever it names
                    touched.add(baby_id)
        if event.decision == "identified" and event.baby_id is not None:
            b = self._babies.setdefault(event.baby_id, _Baby())
            b.heard_at = now
            b.last_cry_at = max(filter(None, (b.last_cry_at, event.ended_at)))
            if event.kind == "expiration":
                if not b.crying or b.episode_id != event.episode_id:
                    b.crying, b.crying_since = True, event.started_at
                b.episode_id = event.episode_id
            else:
                b.crying, b.crying_since = False, None
                b.episode_id = event.episode_id
                b.history.append((event.ended_at, event.duration_s))
            touched.add(event.baby_id)
        out: list[Retained] = []
        for baby_id in sorted(touched):
            out += self._state(baby_id, now)
        if event.kind == "episode" and event.decision == "unknown" and event.episode_id not in self._answered:
            self._pending.appendleft(event)
            out += self._pending_list(now)
        return out

    def waiting(
        self, waiting: Iterable[CryEvent], answered: Collection[str], now: datetime
    ) -> list[Retained]:
        """What the registry says of the cries waiting for a nurse (at start and after every change).

        ``waiting``: the room's final episodes of the last 24 h that named no baby and have no live answer
        (the registry's newest ``PENDING_MAX``); ``answered``: the ids of the room's episodes of the last
        24 h with a live confirmation or rejection. Answered episodes leave the list (also one heard
        later: the registry may know of an answer before the event reaches this stage); the others stay,
        and the waiting ones join them; the newest ``PENDING_MAX`` by end time are kept.
        """
        self._answered = set(answered)
        merged = {e.episode_id: e for e in self._pending}
        for e in waiting:
            merged.setdefault(e.episode_id, e)
        listed = sorted(
            (e for e in merged.values() if e.episode_id not in self._answered),
            key=lambda e: e.ended_at,
            reverse=True,
        )
        self._pending = deque(listed[:PENDING_MAX], maxlen=PENDING_MAX)
        return self._pending_list(now)

    def tick(self, now: datetime) -> list[Retained]:
        """Time out "crying now" and slide the 24 h window."""
        out: list[Retained] = []
        for baby_id, b in self._babies.items():
            if b.crying and b.heard_at is not None and now - b.heard_at > self.timeout:
                logger.info("%s: no cry heard for %s; no longer crying", baby_id, self.timeout)
                b.crying, b.crying_since = False, None
        for baby_id in self._roster:
            out += self._state(baby_id, now)
        return out + (self._pending_list(now) if self._pending else [])  # an episode ages out of 24 h

    def stop(self, now: datetime) -> list[Retained]:
        """The daemon stops: nobody is heard crying any more."""
        for b in self._babies.values():
            b.crying, b.crying_since = False, None
        return self.tick(now)

    # persistence ------------------------------------------------------------------------------
    def save(self, path: Path, now: datetime) -> None:
        """Last cries and the 24 h history of every baby, written atomically (temporary file + rename)."""
        data: dict[str, Any] = {"version": 1, "room": self.room, "babies": {}}
        for baby_id, b in sorted(self._babies.items()):
            recent = [[end.isoformat(), dur] for end, dur in b.history if now - end <= WINDOW]
            if b.last_cry_at is None and not recent:
                continue
            last = b.last_cry_at.isoformat() if b.last_cry_at else None
            data["babies"][baby_id] = {"last_cry_at": last, "episode_id": b.episode_id, "history": recent}
        atomic_write(path, json.dumps(data, indent=1))

    def load(self, path: Path, now: datetime) -> None:
        """What :meth:`save` wrote (nothing when the file is missing; a damaged one is logged and ignored)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            babies = {
                baby_id: _Baby(
                    episode_id=v.get("episode_id"),
                    last_cry_at=_parse_time(v["last_cry_at"]) if v.get("last_cry_at") else None,
                    history=deque((_parse_time(end), float(dur)) for end, dur in v.get("history", []) if end),
                )
                for baby_id, v in data["babies"].items()
            }
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.warning("dashboard state %s not read (%s); the 24 h totals start from zero", path, exc)
            return
        if data.get("room") != self.room:
            logger.info("dashboard state %s is of room %s, not %s: unused", path, data.get("room"), self.room)
            return
        for b in babies.values():
            while b.history and now - b.history[0][0] > WINDOW:
                b.history.popleft()
        self._babies.update(babies)
        logger.info("dashboard state: last cries and 24 h totals of %d babies from %s", len(babies), path)

    def snapshot(self, now: datetime) -> list[Retained]:
        """Every retained message as it stands (after a (re)connect: the broker may have lost them).

        Also the clears of babies gone from the room: one found before the connection (the registry is
        read at start, before the broker answers) could not be published then.
        """
        self._sent.clear()
        clears = [Retained(self.state_topic(baby_id), "") for baby_id in sorted(self._cleared)]
        return clears + self._roster_and_states(now) + self._pending_list(now)

    # outputs --------------------------------------------------------------------------------
    def baby_state(self, baby_id: str, now: datetime) -> BabyState:
        b = self._babies.get(baby_id) or _Baby()
        while b.history and now - b.history[0][0] > WINDOW:
            b.history.popleft()
        return BabyState(
            room=self.room,
            baby_id=baby_id,
            crying=b.crying,
            crying_since=b.crying_since,
            last_cry_at=b.last_cry_at,
            episode_id=b.episode_id,
            episodes_24h=len(b.history),
            cry_minutes_24h=round(sum(dur for _, dur in b.history) / 60.0, 2),
            updated_at=now,
        )

    def _roster_and_states(self, now: datetime) -> list[Retained]:
        roster = Roster(room=self.room, updated_at=now, babies=list(self._roster.values()))
        out = self._changed(self.roster_topic, roster.model_dump_json(exclude={"updated_at"}), roster)
        for baby_id in self._roster:
            out += self._state(baby_id, now)
        return out

    def _state(self, baby_id: str, now: datetime) -> list[Retained]:
        if baby_id not in self._roster:
            return []  # a baby of another room, or not enrolled any more: its room's daemon tells
        st = self.baby_state(baby_id, now)
        return self._changed(self.state_topic(baby_id), st.model_dump_json(exclude={"updated_at"}), st)

    def _pending_list(self, now: datetime) -> list[Retained]:
        while self._pending and now - self._pending[-1].ended_at > WINDOW:
            self._pending.pop()
        key = ",".join(e.event_id for e in self._pending)
        if self._sent.get(self.pending_topic) == key:
            return []  # unchanged (most ticks): the payload is not even built
        msg = PendingCries(room=self.room, updated_at=now, episodes=list(self._pending))
        return self._changed(self.pending_topic, key, msg)

    def _changed(self, topic: str, key: str, model: Roster | BabyState | PendingCries) -> list[Retained]:
        if self._sent.get(topic) == key:
            return []
        self._sent[topic] = key
        return [Retained(topic, model.model_dump_json())]
