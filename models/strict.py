"""The base of cryid's settings and payloads: a pydantic model that refuses unknown fields and is frozen."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A pydantic model with ``extra="forbid"`` (a misspelt field is an error, not ignored) and
    ``frozen=True`` (settings and events do not change once made)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
