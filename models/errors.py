"""The root of every error a user can fix: ``CryidError``; each area subclasses it.

The ``cryid`` command prints a ``CryidError`` (and an ``OSError``) as one line, ``cryid: error: ...``,
and exits non-zero; any other exception is a bug and keeps its traceback. ``CryidError`` derives from
``ValueError`` so that code catching bad input as ``ValueError`` keeps working, but the command never
treats a bare ``ValueError`` (from numpy, pydantic, json...) as a user error: raise a subclass of
``CryidError`` with a message naming the problem and the fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class CryidError(ValueError):
    """A problem the user can fix; the message names the problem and the fix, on one line."""


class UsageError(CryidError):
    """A bad command-line argument or combination of arguments."""


class SettingsError(CryidError):
    """A bad setting (environment, TOML file, secret file)."""


def validation_message(
    exc: ValidationError, *, where: str = "", every: bool = False, inputs: bool = False, options: bool = False
) -> str:
    """A pydantic ``ValidationError`` on one line: ``loc.path: message`` of its first error.

    ``where`` names an error without a location (a whole model); ``every``: all errors, joined by "; ";
    ``inputs``: each with `` (got INPUT)``; ``options``: the fields are command-line options, shown as
    ``--room-size: message`` without pydantic's "Value error, " prefix.
    """
    parts = []
    for err in exc.errors() if every else exc.errors()[:1]:
        loc, msg = err.get("loc", ()), err.get("msg", "invalid")
        if options:
            flag = f"--{str(loc[0]).replace('_', '-')}: " if loc else ""
            parts.append(flag + msg.removeprefix("Value error, "))
            continue
        got = f" (got {err.get('input')!r})" if inputs else ""
        parts.append(f"{'.'.join(str(x) for x in loc) or where}: {msg}{got}")
    return "; ".join(parts)
