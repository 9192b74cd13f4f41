"""The room's retained dashboard state on MQTT (:class:`~cryid.daemon.state.RoomState`), fed by the daemon.

The pipeline thread hands every published identification to :meth:`RoomFeed.observe` (a queue); the
main thread calls :meth:`RoomFeed.update` every loop (the identifications, "crying now" time-outs once
a second, everything again after a reconnection), :meth:`RoomFeed.roster` and :meth:`RoomFeed.waiting`
when the registry changed (also at start) and :meth:`RoomFeed.stop` at the end. The last cries and 24 h
totals are kept in ``dashboard-state.json`` in the state directory after every final episode, so a
restart goes on with them; the cries waiting for a nurse are read from the registry's kept episodes
(:meth:`RoomFeed.waiting`), so a restart lists them again and an answer from anywhere removes one.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from cryid.daemon.events import CryEvent
from cryid.daemon.state import PENDING_MAX, WINDOW, Retained, RoomState
from cryid.models.errors import validation_message

logger = logging.getLogger(__name__)


class RetainedPublisher(Protocol):
    """What the feed needs of :class:`cryid.daemon.mqtt.MqttPublisher`."""

    prefix: str

    @property
    def connected(self) -> bool: ...

    def publish_retained(self, topic: str, payload: str) -> bool: ...


class EpisodeSource(Protocol):
    """What the feed reads of the registry (``cryid.enrollment.registry.Registry``)."""

    def waiting_episodes(self, room: str, since: datetime, limit: int) -> list[Any]: ...  # Episode

    def answered_episodes(self, room: str, since: datetime) -> set[str]: ...


def read_waiting(
    registry: EpisodeSource, room: str, now: datetime, unreadable: set[str] | None = None
) -> tuple[list[CryEvent], set[str]]:
    """For :meth:`RoomState.waiting`: the final events of the room's kept episodes of the last 24 h that
    named no baby and have no answer (newest first, at most ``PENDING_MAX``), and the ids of those answered.

    An episode whose stored event cannot be read (kept by another version, or damaged) is left out with
    a warning (once: its id goes into ``unreadable``); the others still count."""
    since = now - WINDOW
    answered = registry.answered_episodes(room, since)
    waiting: list[CryEvent] = []
    for ep in registry.waiting_episodes(room, since, PENDING_MAX):
        try:
            waiting.append(CryEvent.model_validate_json(ep.event_json))
        except ValidationError as exc:
            if unreadable is not None:
                if ep.episode_id in unreadable:
                    continue
                unreadable.add(ep.episode_id)
            logger.warning(
                "episode %s not listed as pending: its stored event is unreadable (%s)",
                ep.episode_id,
                validation_message(exc, where="event"),
            )
    return waiting, answered


class RoomFeed:
    """Identifications in (any thread), retained dashboard messages out (main thread)."""

    def __init__(
        self, publisher: RetainedPublisher, room: str, crying_timeout_s: float, state_dir: Path
    ) -> None:
        self.state = RoomState(publisher.prefix, room, crying_timeout_s)
        self._publisher = publisher
        self._events: queue.SimpleQueue[CryEvent] = queue.SimpleQueue()
        self._online = False
        self._next_tick = 0.0
        self._file = state_dir / "dashboard-state.json"
        self._unreadable: set[str] = set()  # kept episodes whose stored event could not be read (warned)
        self.state.load(self._file, datetime.now(timezone.utc))

    def observe(self, ev: CryEvent) -> None:
        """Any thread: an identification the daemon published."""
        self._events.put(ev)

    def roster(self, infants: Iterable[Any]) -> None:
        """Main thread: the room's infants changed (or were read again)."""
        self._publish(self.state.roster(infants, datetime.now(timezone.utc)))

    def waiting(self, registry: EpisodeSource) -> None:
        """Main thread, at start and after every registry change: the room's cries still waiting for a
        nurse (kept episodes of the last 24 h without an answer) and those answered meanwhile."""
        now = datetime.now(timezone.utc)
        waiting, answered = read_waiting(registry, self.state.room, now, self._unreadable)
        self._publish(self.state.waiting(waiting, answered, now))

    def update(self, now: float) -> None:
        """Main thread: identifications, "crying now" time-outs, all again after a reconnect."""
        wall = datetime.now(timezone.utc)
        if self._publisher.connected != self._online:
            self._online = self._publisher.connected
            if self._online:  # the snapshot holds the roster, the states and every clear
                self._publish(self.state.snapshot(wall))
        while True:
            try:
                ev = self._events.get_nowait()
            except queue.Empty:
                break
            self._publish(self.state.observe(ev, wall))
            if ev.kind == "episode":
                self._save(wall)
        if now >= self._next_tick:
            self._publish(self.state.tick(wall))
            self._next_tick = now + 1.0

    def stop(self, now: float) -> None:
        """Main thread, at the end: the last identifications, then nobody is crying."""
        self.update(now)
        self._publish(self.state.stop(datetime.now(timezone.utc)))

    def _save(self, now: datetime) -> None:
        try:
            self.state.save(self._file, now)
        except OSError as exc:  # the totals are a convenience: a full disk must not stop identification
            logger.error("dashboard state not saved to %s: %s", self._file, exc)

    def _publish(self, messages: list[Retained]) -> None:
        """The publisher drops retained messages while offline; the snapshot after the next connection
        sends them all again, the clears of babies who left included (``RoomState.snapshot``)."""
        for m in messages:
            self._publisher.publish_retained(m.topic, m.payload)
