"""Settings of the enrollment layer (registry and enrollment rules). Each default written once."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pydantic import Field, field_validator

from cryid.models.strict import StrictModel

if TYPE_CHECKING:
    from cryid.models.config import EmbedderSettings, SegmenterSettings

_PLAIN_FILENAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def plain_filename(cls: type, v: str) -> str:
    """A file name inside the state directory: letters, digits, '.', '_', '-'; no path, no '..'."""
    if not _PLAIN_FILENAME.fullmatch(v) or ".." in v:
        raise ValueError(
            "must be a plain file name inside the state directory (letters, digits, '.', '_', '-'; "
            "no '/' or '..'); move the state directory with CRYID_STATE_DIR instead"
        )
    return v


class RegistrySettings(StrictModel):
    """The infant registry (SQLite in ``CRYID_STATE_DIR``) and the rules enrollment applies."""

    filename: str = Field(
        "registry.sqlite3",
        description="Registry file name inside the state directory (a plain name, no path).",
    )
    min_cry_s: float = Field(
        2.0, ge=0.0, le=600.0, description="Seconds of detected cry an enrollment needs at least."
    )
    confusable_similarity: float = Field(
        0.85,
        ge=-1.0,
        le=1.0,
        description="Warn at enrollment when a new centroid is at least this similar to another baby's.",
    )
    keep_audio: bool = Field(
        False, description="Keep enrollment audio (needed for `cryid enroll reembed` after a model change)."
    )
    _plain_filename = field_validator("filename")(classmethod(plain_filename))  # type: ignore[arg-type]

    busy_timeout_ms: int = Field(10000, ge=0, le=600000, description="SQLite busy timeout.")
    episode_retention_days: float = Field(
        14.0,
        gt=0.0,
        le=3650.0,
        description="Days the daemon keeps each episode's expiration embeddings (numbers, never audio) "
        "for nurses to confirm or reject; older episodes are purged (confirmations keep their copy).",
    )
    episode_purge_interval_s: float = Field(
        3600.0, gt=0.0, le=86400.0, description="How often the running daemon purges expired episodes."
    )


class RegistryPlace(Protocol):
    """What the registry commands read of the settings: where the registry is and its rules.

    The settings are the daemon's composed ``cryid.daemon.config.Settings``, which this layer cannot
    import; it satisfies this protocol and ``EnrollmentSettings``.
    """

    @property
    def state_dir(self) -> Path: ...

    @property
    def registry(self) -> RegistrySettings: ...


class EnrollmentSettings(RegistryPlace, Protocol):
    """What ``cryid enroll`` reads of the settings: the registry, the room, the model, how to segment and
    embed."""

    @property
    def room(self) -> str: ...

    @property
    def model(self) -> Path: ...

    @property
    def segmenter(self) -> SegmenterSettings: ...

    @property
    def embedder(self) -> EmbedderSettings: ...
