"""``cryid enroll confirm|reject|undo|episodes``: the nurse teaches the daemon which cries were whose.

Handlers get ``(args, settings)``; bad input raises a ``ValueError`` (``FeedbackError``) that ``cryid``
prints as one line, with a non-zero exit and the registry unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json

from cryid.enrollment import feedback
from cryid.enrollment.config import RegistryPlace
from cryid.enrollment.episodes import Feedback
from cryid.enrollment.registry import Registry


def _registry(settings: RegistryPlace) -> Registry:
    return Registry.open(settings.state_dir, settings.registry)


def _by(args: argparse.Namespace) -> str:
    if args.by is not None:
        return str(args.by)
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        raise feedback.FeedbackError("cannot tell who you are; name yourself with --by NAME") from None


def describe(f: Feedback) -> str:
    """One line per confirmation, for ``confirm``/``reject``/``undo`` and ``enroll show``."""
    what = "is" if f.kind == "confirm" else "is NOT"
    line = (
        f"#{f.confirmation_id} {f.kind}: episode {f.episode_id} (room {f.room}, "
        f"{f.episode_started_at[:19]}Z, {f.n_expirations} expirations) {what} {f.baby_id}; "
        f"by {f.created_by} via {f.via} at {f.created_at[:19]}Z"
    )
    if f.undone_at:
        line += f"; undone by {f.undone_by} at {f.undone_at[:19]}Z"
    return line


def _confirm_or_reject(args: argparse.Namespace, settings: RegistryPlace) -> int:
    """``confirm`` and ``reject``: ``args.decide`` is ``feedback.confirm`` or ``feedback.reject``."""
    with _registry(settings) as reg:
        f = args.decide(
            reg, args.episode_id, args.baby_id, settings.registry, by=_by(args), via="cli", room=args.room
        )
    print(f"confirmation {f.confirmation_id}: " + describe(f))
    return 0


def _undo(args: argparse.Namespace, settings: RegistryPlace) -> int:
    with _registry(settings) as reg:
        f = feedback.undo(reg, args.confirmation_id, by=_by(args))
    print("undone " + describe(f))
    return 0


def _episodes(args: argparse.Namespace, settings: RegistryPlace) -> int:
    with _registry(settings) as reg:
        eps = reg.episodes(room=args.room, limit=args.limit)
        marks = {e.episode_id: [f for f in reg.feedback(episode_id=e.episode_id) if f.live] for e in eps}
    if args.json:
        rows = [
            dataclasses.asdict(e) | {"feedback": [dataclasses.asdict(f) for f in marks[e.episode_id]]}
            for e in eps
        ]
        print(json.dumps({"episodes": rows}, indent=2))
        return 0
    if not eps:
        print("no episodes kept (the daemon keeps each crying episode for registry.episode_retention_days)")
        return 0
    for e in eps:
        named = e.baby_id or f"unknown (best {e.best_baby_id or '-'})"
        notes = ", ".join(f"#{f.confirmation_id} {f.kind} {f.baby_id}" for f in marks[e.episode_id])
        print(
            f"{e.episode_id}  room {e.room}  {e.started_at[:19]}Z  {e.n_expirations:3d} exp.  {named}"
            + (f"  [{notes}]" if notes else "")
        )
    return 0


def _confirmation_id(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a confirmation id (a positive whole number)")
    return int(text)


def _who(p: argparse.ArgumentParser) -> None:
    p.add_argument("--by", default=None, metavar="NAME", help="Who decides (default: your user name).")


def register(esub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add confirm, reject, undo and episodes to ``cryid enroll``."""
    c = esub.add_parser("confirm", help="These cries were BABY_ID's: add them to its confirmed reference.")
    c.add_argument("episode_id", metavar="EPISODE_ID", help="episode_id of a cry event (see `episodes`).")
    c.add_argument("baby_id", metavar="BABY_ID")
    c.add_argument("--room", default=None, help="Refuse unless the episode was heard in this room.")
    _who(c)
    c.set_defaults(func=_confirm_or_reject, decide=feedback.confirm)

    r = esub.add_parser(
        "reject", help="These cries were NOT BABY_ID's (default: the baby they were named as)."
    )
    r.add_argument("episode_id", metavar="EPISODE_ID")
    r.add_argument("baby_id", metavar="BABY_ID", nargs="?", default=None)
    r.add_argument("--room", default=None, help="Refuse unless the episode was heard in this room.")
    _who(r)
    r.set_defaults(func=_confirm_or_reject, decide=feedback.reject)

    u = esub.add_parser("undo", help="Take a confirmation or rejection back.")
    u.add_argument("confirmation_id", metavar="CONFIRMATION_ID", type=_confirmation_id)
    _who(u)
    u.set_defaults(func=_undo)

    e = esub.add_parser("episodes", help="Recent crying episodes kept for confirmation (newest first).")
    e.add_argument("--room", default=None, help="Only this room.")
    e.add_argument("--limit", type=int, default=20, help="How many (newest first).")
    e.add_argument("--json", action="store_true", help="JSON instead of text.")
    e.set_defaults(func=_episodes)
