"""The root of every error a user can fix: ``CryidError``; each area subclasses it.

The ``cryid`` command prints a ``CryidError`` (and an ``OSError``) as one line, ``cryid: error: ...``,
and exits non-zero; any other exception is a bug and keeps its traceback. ``CryidError`` derives from
``ValueError`` so that code catching bad input as ``ValueError`` keeps working, but the command never
treats a bare ``ValueError`` (from numpy, pydantic, json...) as a user error: raise a subclass of
``CryidError`` with a message naming the problem and the fix.
"""

from __future__ import annotations


class CryidError(ValueError):
    """A problem the user can fix; the message names the problem and the fix, on one line."""


class UsageError(CryidError):
    """A bad command-line argument or combination of arguments."""


class SettingsError(CryidError):
    """A bad setting (environment, TOML file, secret file)."""
