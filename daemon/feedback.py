"""Nurses' commands over MQTT: confirm, reject and undo, answered on ``<prefix>/cmd/result``.

Topics (only the broker user ``nurse`` may publish them; see deploy/mosquitto/acl):

- ``<prefix>/cmd/confirm``: :class:`ConfirmCommand`, "the cries of episode E were baby X's".
- ``<prefix>/cmd/reject``: :class:`RejectCommand`, "episode E was not baby X" (default: the baby named).
- ``<prefix>/cmd/undo``: :class:`UndoCommand`, take a confirmation or rejection back.
- ``<prefix>/cmd/result``: :class:`CommandResult`, one per command, with its ``request_id``.

The daemon applies them through the enrollment layer (:mod:`cryid.enrollment.feedback`), the same code
as ``cryid enroll confirm|reject|undo``: a command for an episode heard in another room, an unknown or
purged episode, a discharged or unknown baby, a duplicate, a malformed payload or one over
:data:`MAX_COMMAND_BYTES` is refused (``ok: false`` and a one-line ``error``) and changes nothing.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError

from cryid.enrollment import feedback
from cryid.enrollment.registry import RegistryError
from cryid.models.errors import validation_message
from cryid.models.strict import StrictModel

if TYPE_CHECKING:
    from cryid.enrollment.config import RegistrySettings
    from cryid.enrollment.episodes import Feedback
    from cryid.enrollment.registry import Registry

logger = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 4096  # a command is a few ids: anything longer is refused unread
COMMAND_VERBS = ("confirm", "reject", "undo")
RESULT_VERB = "result"
_ID = r"^[A-Za-z0-9_-]{1,64}$"


class _Command(StrictModel):
    request_id: str = Field(
        ..., min_length=1, max_length=64, description="Chosen by the sender; the result carries it back."
    )
    by: str | None = Field(
        None, min_length=1, max_length=64, description="Who decides (the nurse's name); default `nurse`."
    )


class ConfirmCommand(_Command):
    """``<prefix>/cmd/confirm``: the cries of an episode were this baby's."""

    episode_id: str = Field(..., pattern=_ID, description="episode_id of the cry event being confirmed.")
    baby_id: str = Field(..., pattern=_ID, description="The baby whose cries these were.")


class RejectCommand(_Command):
    """``<prefix>/cmd/reject``: the cries of an episode were NOT this baby's."""

    episode_id: str = Field(..., pattern=_ID, description="episode_id of the cry event being rejected.")
    baby_id: str | None = Field(
        None, pattern=_ID, description="The baby it was not; default: the baby the episode was named as."
    )


class UndoCommand(_Command):
    """``<prefix>/cmd/undo``: take a confirmation or rejection back."""

    confirmation_id: int = Field(..., ge=1, description="confirmation_id of an earlier result.")


class CommandResult(StrictModel):
    """``<prefix>/cmd/result``: the answer to one command."""

    request_id: str | None = Field(..., description="The command's request_id; null if it was unreadable.")
    command: Literal["confirm", "reject", "undo"] = Field(..., description="The topic it came on.")
    ok: bool = Field(..., description="True when the registry was changed as asked.")
    error: str | None = Field(..., description="Why not (one line naming the problem and the fix).")
    confirmation_id: int | None = Field(..., description="The confirmation made or undone, when ok.")
    episode_id: str | None = Field(None, description="The episode concerned, when known.")
    baby_id: str | None = Field(None, description="The baby confirmed, rejected or undone, when ok.")
    at: datetime = Field(..., description="UTC time of the answer.")

    def to_json(self) -> str:
        return self.model_dump_json()


COMMAND_MODELS: dict[str, type[_Command]] = {
    "confirm": ConfirmCommand,
    "reject": RejectCommand,
    "undo": UndoCommand,
}


def json_schemas(prefix: str = "<prefix>") -> dict[str, Any]:
    """JSON Schemas of the command topics, for ``cryid schema``."""
    out: dict[str, Any] = {f"{prefix}/cmd/{v}": m.model_json_schema() for v, m in COMMAND_MODELS.items()}
    out[f"{prefix}/cmd/{RESULT_VERB}"] = CommandResult.model_json_schema()
    return out


def _short(value: Any) -> str | None:
    """An id from a payload that may be malformed: kept only if it is a short string."""
    return value if isinstance(value, str) and 0 < len(value) <= 64 else None


class CommandHandler:
    """Parses one command payload and applies it to the registry; a plain synchronous stage."""

    def __init__(self, registry: Registry, settings: RegistrySettings, room: str) -> None:
        self.registry = registry
        self.settings = settings
        self.room = room

    def failure(self, verb: str, payload: bytes, error: str) -> CommandResult:
        """A refusal of ``payload`` for a reason found outside :meth:`handle` (an internal error)."""
        request_id = episode_id = None
        try:
            doc = json.loads(payload.decode("utf-8")) if len(payload) <= MAX_COMMAND_BYTES else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            doc = None
        if isinstance(doc, dict):
            request_id, episode_id = _short(doc.get("request_id")), _short(doc.get("episode_id"))
        return CommandResult(
            request_id=request_id, command=verb if verb in COMMAND_MODELS else "confirm", ok=False,
            error=error, confirmation_id=None, episode_id=episode_id, at=datetime.now(timezone.utc),
        )

    def handle(self, verb: str, payload: bytes, now: datetime | None = None) -> CommandResult:
        """The result of one command (never raises for bad input: ``ok`` is false with the reason)."""
        at = now or datetime.now(timezone.utc)
        request_id: str | None = None
        episode_id: str | None = None

        def refuse(why: str) -> CommandResult:
            logger.warning("cmd/%s refused (request %s): %s", verb, request_id, why)
            return CommandResult(
                request_id=request_id, command=verb, ok=False, error=why, confirmation_id=None,
                episode_id=episode_id, at=at,
            )

        if verb not in COMMAND_MODELS:
            raise ValueError(f"unknown command {verb!r}")  # the subscriptions make this a bug
        if len(payload) > MAX_COMMAND_BYTES:
            return refuse(f"payload of {len(payload)} bytes is over the {MAX_COMMAND_BYTES}-byte limit")
        try:
            doc = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return refuse(f"payload is not JSON ({exc}); send a JSON object, see `cryid schema`")
        if not isinstance(doc, dict):
            return refuse("payload must be a JSON object; see `cryid schema`")
        request_id, episode_id = _short(doc.get("request_id")), _short(doc.get("episode_id"))
        try:
            cmd = COMMAND_MODELS[verb].model_validate(doc)
        except ValidationError as exc:
            problem = validation_message(exc, where="payload")
            return refuse(f"malformed {verb} command: {problem}; see `cryid schema`")
        by = cmd.by or "nurse"
        try:
            if isinstance(cmd, ConfirmCommand):
                fb: Feedback = feedback.confirm(
                    self.registry, cmd.episode_id, cmd.baby_id, self.settings, by=by, via="mqtt",
                    room=self.room, now=at,
                )
            elif isinstance(cmd, RejectCommand):
                fb = feedback.reject(
                    self.registry, cmd.episode_id, cmd.baby_id, self.settings, by=by, via="mqtt",
                    room=self.room, now=at,
                )
            elif isinstance(cmd, UndoCommand):
                old = self.registry.get_feedback(cmd.confirmation_id)
                if old is not None and old.room != self.room:
                    return refuse(
                        f"confirmation {cmd.confirmation_id} belongs to room {old.room!r}, not "
                        f"{self.room!r}; send the undo to room {old.room!r}"
                    )
                fb = feedback.undo(self.registry, cmd.confirmation_id, by=by, now=at)
            else:
                raise TypeError(f"no handler for {type(cmd).__name__}")
        except RegistryError as exc:
            return refuse(str(exc))
        logger.info("cmd/%s (request %s): confirmation %d", verb, request_id, fb.confirmation_id)
        return CommandResult(
            request_id=request_id, command=verb, ok=True, error=None, confirmation_id=fb.confirmation_id,
            episode_id=fb.episode_id, baby_id=fb.baby_id, at=at,
        )

