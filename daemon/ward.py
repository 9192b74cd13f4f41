"""The ward teaches the model: final episodes kept for the nurses, their commands applied, old ones purged.

The pipeline thread hands every final episode (its expiration embeddings) to :meth:`Ward.keep`; paho's
thread hands nurses' MQTT commands (:mod:`cryid.daemon.feedback`) to :meth:`Ward.command`. Both wait
on bounded queues (a flood is refused with a warning, never blocks the caller) until the main thread
calls :meth:`Ward.serve`, which keeps the episodes in the registry
(:func:`cryid.enrollment.feedback.keep_episode`), applies the commands, answers each on
``<prefix>/cmd/result``; :meth:`Ward.purge_if_due` purges expired episodes every
``registry.episode_purge_interval_s``.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from typing import Any

from cryid.daemon.events import CryEvent
from cryid.daemon.feedback import CommandHandler
from cryid.daemon.identifier import Identification
from cryid.enrollment import feedback as ward_feedback
from cryid.enrollment.episodes import NewEpisode

logger = logging.getLogger(__name__)


class Ward:
    """Episodes and nurses' commands from other threads, applied to the registry by the main thread."""

    def __init__(
        self,
        registry: Any,
        settings: Any,  # RegistrySettings
        room: str,
        answer: Callable[[str], object],
        wake: Callable[[], None],
    ) -> None:
        """``answer``: publishes a command's result (JSON); ``wake``: asks the main thread to serve now."""
        self.registry = registry
        self.settings = settings
        self.commands = CommandHandler(registry, settings, room)
        self._answer = answer
        self._wake = wake
        self._episodes: queue.Queue[NewEpisode] = queue.Queue(maxsize=1000)
        self._commands: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=64)
        self._next_purge = 0.0

    def keep(self, r: Identification, ev: CryEvent) -> None:
        """Any thread: a final episode's embeddings, to be kept in the registry."""
        if r.embeddings is None:
            return
        ep = NewEpisode(
            episode_id=ev.episode_id, room=ev.room, started_at=ev.started_at, ended_at=ev.ended_at,
            model_sha256=ev.model_sha256, decision=ev.decision, baby_id=ev.baby_id,
            best_baby_id=ev.best_baby_id, event_json=ev.to_json(), vectors=r.embeddings,
        )  # fmt: skip
        try:
            self._episodes.put_nowait(ep)
        except queue.Full:
            logger.warning("episode %s not kept: the registry is not keeping up", ev.episode_id)
        self._wake()

    def command(self, verb: str, payload: bytes) -> None:
        """A nurse's command (paho's thread): queue it for the main thread, or refuse it when flooded."""
        try:
            self._commands.put_nowait((verb, payload))
        except queue.Full:
            logger.warning("cmd/%s dropped: %d commands already wait", verb, self._commands.qsize())
            return
        self._wake()

    def serve(self) -> bool:
        """Main thread: keep the episodes, apply the commands; True when a command changed the registry
        (the caller reloads the references at once)."""
        while True:
            try:
                ep = self._episodes.get_nowait()
            except queue.Empty:
                break
            try:
                ward_feedback.keep_episode(self.registry, ep, self.settings)
            except Exception:  # loop boundary: a failed write must not stop the ward's daemon
                logger.exception("episode %s could not be kept in the registry", ep.episode_id)
        applied = False
        while True:
            try:
                verb, payload = self._commands.get_nowait()
            except queue.Empty:
                break
            try:
                result = self.commands.handle(verb, payload)
            except Exception as exc:  # loop boundary: answer, log, carry on
                logger.exception("cmd/%s failed", verb)
                result = self.commands.failure(verb, payload, f"internal error: {exc}")
            self._answer(result.to_json())
            applied = applied or result.ok
        return applied

    def purge_if_due(self, now: float) -> None:
        """Main thread: delete expired episodes, every ``registry.episode_purge_interval_s``."""
        if now >= self._next_purge:
            self._next_purge = now + self.settings.episode_purge_interval_s
            try:
                ward_feedback.purge_episodes(self.registry, self.settings)
            except Exception:  # loop boundary
                logger.exception("expired episodes could not be purged")
