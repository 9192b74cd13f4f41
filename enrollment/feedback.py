"""The ward teaches the model: keep the daemon's episodes, and the nurses' confirm / reject / undo.

- :func:`keep_episode` (called by the daemon for every final episode) stores its expiration embeddings
  (numbers, never audio) and purges episodes older than ``registry.episode_retention_days``.
- :func:`confirm` adds a kept episode's embeddings to a baby's *confirmed* reference (the daemon scores
  it beside the birth reference, weighted by the model's ``calibration.confirmed_weight``);
  :func:`reject` records "not this baby"; :func:`undo` takes either back. Each has provenance: who,
  when, through what (``cli`` / ``mqtt``), which episode.

A bad request raises :class:`FeedbackError` (a ``RegistryError``: one line naming the problem and the
fix) after checks that write nothing, and the checks are repeated inside the write transaction, so
a refused request leaves the registry file byte-for-byte unchanged. Time comes in as ``now`` (tests
inject it), defaulting to the wall clock.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta, timezone

from cryid.enrollment.config import RegistrySettings
from cryid.enrollment.episodes import Episode, Feedback, NewEpisode, iso_utc
from cryid.enrollment.registry import Registry, RegistryError, check_baby_id

logger = logging.getLogger(__name__)

EPISODE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_BY_CHARS = 64


class FeedbackError(RegistryError):
    """A confirm / reject / undo that cannot be done as asked; the message names the problem and the fix."""


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(timezone.utc)


def _cutoff(settings: RegistrySettings, now: datetime | None) -> datetime:
    return _now(now) - timedelta(days=settings.episode_retention_days)


def check_episode_id(episode_id: str) -> str:
    if not isinstance(episode_id, str) or not EPISODE_ID_PATTERN.fullmatch(episode_id):
        raise FeedbackError(
            f"episode id {str(episode_id)[:80]!r} is malformed: use the episode_id of a cry event "
            "(see `cryid enroll episodes`)"
        )
    return episode_id


def check_by(by: str) -> str:
    by = (by or "").strip()
    if not by or len(by) > MAX_BY_CHARS or not by.isprintable():
        raise FeedbackError(f"--by must name who confirms: 1-{MAX_BY_CHARS} printable characters")
    return by


# ------------------------------------------------------------------------------------- episodes
def keep_episode(
    registry: Registry, episode: NewEpisode, settings: RegistrySettings, now: datetime | None = None
) -> int:
    """Store one final episode and purge expired ones (one transaction); returns how many were purged.

    Does not change the writing connection's ``data_version`` (the daemon's references stay as they are).
    """
    check_episode_id(episode.episode_id)
    at = _now(now)
    with registry.write(bump=False) as tx:
        tx.insert_episode(episode, at)
        purged = tx.delete_episodes_before(_cutoff(settings, at))
    if purged:
        logger.info("purged %d episodes older than %g days", purged, settings.episode_retention_days)
    return purged


def purge_episodes(registry: Registry, settings: RegistrySettings, now: datetime | None = None) -> int:
    """Delete episodes that ended more than ``registry.episode_retention_days`` ago; returns how many."""
    cutoff = _cutoff(settings, now)
    with registry.write(bump=False) as tx:
        purged = tx.delete_episodes_before(cutoff)
    if purged:
        logger.info("purged %d episodes older than %g days", purged, settings.episode_retention_days)
    return purged


def _kept_episode(registry: Registry, episode_id: str, settings: RegistrySettings, now: datetime) -> Episode:
    ep = registry.get_episode(check_episode_id(episode_id))
    days = f"{settings.episode_retention_days:g}"
    if ep is None:
        raise FeedbackError(
            f"episode {episode_id} is not in the registry (never heard here, or purged after "
            f"registry.episode_retention_days = {days} days); see `cryid enroll episodes`"
        )
    if ep.ended_at < iso_utc(_cutoff(settings, now)):
        raise FeedbackError(
            f"episode {episode_id} has expired (older than registry.episode_retention_days = {days} days) "
            "and is being purged; confirm a recent episode instead"
        )
    return ep


def _check_room(ep: Episode, room: str | None) -> None:
    if room is not None and ep.room != room:
        raise FeedbackError(
            f"episode {ep.episode_id} was heard in room {ep.room!r}, not {room!r}; "
            f"send the command to room {ep.room!r}"
        )


def _active_infant(registry: Registry, baby_id: str) -> None:
    check_baby_id(baby_id)
    infant = registry.get_infant(baby_id)
    if infant is None:
        raise FeedbackError(f"baby {baby_id!r} is not enrolled; see `cryid enroll list`")
    if infant.status != "active":
        raise FeedbackError(
            f"baby {baby_id!r} is discharged; confirm cries of babies still on the ward "
            f"(or re-enroll with `cryid enroll add {baby_id} --replace`)"
        )


def _conflict(kind: str, episode_id: str, baby_id: str, live: list[tuple[int, str, str]]) -> str | None:
    """Why a new ``kind`` row for (episode, baby) clashes with the episode's live rows, or None."""
    for cid, k, b in live:
        undo_first = f"; `cryid enroll undo {cid}` first"
        if kind == "confirm" and k == "confirm":
            if b == baby_id:
                return f"episode {episode_id} is already confirmed as {baby_id} (confirmation {cid})"
            return f"episode {episode_id} is already confirmed as {b} (confirmation {cid}){undo_first}"
        if b != baby_id:
            continue
        if k == kind:  # a second rejection of the same baby
            return f"episode {episode_id} is already rejected as {baby_id} (confirmation {cid})"
        done = "rejected" if k == "reject" else "confirmed"
        return f"episode {episode_id} was {done} as {baby_id} (confirmation {cid}){undo_first}"
    return None


def _record(
    registry: Registry,
    kind: str,
    ep: Episode,
    baby_id: str,
    settings: RegistrySettings,
    by: str,
    via: str,
    at: datetime,
) -> Feedback:
    problem = _conflict(kind, ep.episode_id, baby_id, _live(registry, ep.episode_id))
    if problem:
        raise FeedbackError(problem)
    with registry.write() as tx:  # every check again, under the write lock; nothing written yet
        if registry.get_episode(ep.episode_id) is None:
            raise FeedbackError(f"episode {ep.episode_id} was purged meanwhile; confirm a recent episode")
        infant = registry.get_infant(baby_id)
        if infant is None or infant.status != "active":
            raise FeedbackError(
                f"baby {baby_id!r} was removed or discharged meanwhile; see `cryid enroll list`"
            )
        problem = _conflict(kind, ep.episode_id, baby_id, tx.live_feedback(ep.episode_id))
        if problem:
            raise FeedbackError(problem)
        cid = tx.insert_feedback(kind, ep.episode_id, baby_id, by, via, at)
        purged = tx.delete_episodes_before(_cutoff(settings, at))
    logger.info(
        "%s: episode %s %s %s by %s via %s (confirmation %d; %d expired episodes purged)",
        kind, ep.episode_id, "is" if kind == "confirm" else "is not", baby_id, by, via, cid, purged,
    )
    got = registry.get_feedback(cid)
    if got is None:  # pragma: no cover - just committed
        raise RuntimeError(f"confirmation {cid} vanished after commit")
    return got


def _checked_request(
    registry: Registry, episode_id: str, settings: RegistrySettings, by: str, room: str | None,
    now: datetime | None,
) -> tuple[datetime, str, Episode]:
    """The checks of a confirm or reject that write nothing: (time, who, the kept episode)."""
    at = _now(now)
    by = check_by(by)
    ep = _kept_episode(registry, episode_id, settings, at)
    _check_room(ep, room)
    return at, by, ep


def _live(registry: Registry, episode_id: str) -> list[tuple[int, str, str]]:
    rows = registry.feedback(episode_id=episode_id)
    return [(f.confirmation_id, f.kind, f.baby_id) for f in rows if f.live]


def confirm(
    registry: Registry,
    episode_id: str,
    baby_id: str,
    settings: RegistrySettings,
    *,
    by: str,
    via: str = "cli",
    room: str | None = None,
    now: datetime | None = None,
) -> Feedback:
    """The cries of a kept episode are ``baby_id``'s: they join its confirmed reference.

    ``room``: when given (the daemon's MQTT commands), the episode must have been heard in that room.
    """
    at, by, ep = _checked_request(registry, episode_id, settings, by, room, now)
    _active_infant(registry, baby_id)
    return _record(registry, "confirm", ep, baby_id, settings, by, via, at)


def reject(
    registry: Registry,
    episode_id: str,
    baby_id: str | None,
    settings: RegistrySettings,
    *,
    by: str,
    via: str = "cli",
    room: str | None = None,
    now: datetime | None = None,
) -> Feedback:
    """A kept episode is NOT ``baby_id`` (default: the baby the daemon named)."""
    at, by, ep = _checked_request(registry, episode_id, settings, by, room, now)
    if baby_id is None:
        if ep.baby_id is None:
            raise FeedbackError(
                f"episode {episode_id} named no baby (best match {ep.best_baby_id or 'none'}); "
                "say which baby it is not: `cryid enroll reject EPISODE_ID BABY_ID`"
            )
        baby_id = ep.baby_id
    _active_infant(registry, baby_id)
    return _record(registry, "reject", ep, baby_id, settings, by, via, at)


def undo(registry: Registry, confirmation_id: int, *, by: str, now: datetime | None = None) -> Feedback:
    """Take a confirmation or rejection back (the row stays, marked undone, for the record)."""
    by = check_by(by)
    if isinstance(confirmation_id, bool) or not isinstance(confirmation_id, int) or confirmation_id < 1:
        raise FeedbackError(f"confirmation id {confirmation_id!r} is malformed: a positive whole number")
    fb = registry.get_feedback(confirmation_id)
    if fb is None:
        raise FeedbackError(f"confirmation {confirmation_id} does not exist; see `cryid enroll show BABY_ID`")
    if not fb.live:
        raise FeedbackError(
            f"confirmation {confirmation_id} was already undone at {fb.undone_at} by {fb.undone_by}"
        )
    at = _now(now)
    with registry.write() as tx:
        if not tx.mark_feedback_undone(confirmation_id, by, at):
            raise FeedbackError(f"confirmation {confirmation_id} was undone or removed meanwhile")
    logger.info("undo: confirmation %d (%s %s of episode %s) by %s", confirmation_id, fb.kind, fb.baby_id,
                fb.episode_id, by)
    got = registry.get_feedback(confirmation_id)
    if got is None:  # pragma: no cover - just committed
        raise RuntimeError(f"confirmation {confirmation_id} vanished after commit")
    return got
