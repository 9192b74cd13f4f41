"""SQLite files in the state directory (registry, outbox): private modes, one-line failures, checks.

Kept apart from :mod:`cryid.enrollment.registry` so the registry and the daemon's outbox say the same
thing about the same failure: a damaged file, a permission problem, a full disk, another program's file.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np

MAX_VECTOR_NORM = 1e4  # real embeddings have norms of tens
MIN_VECTOR_NORM = 1e-3


def make_private_dir(state_dir: Path, error: type[Exception]) -> None:
    """Create the state directory 0700 (only the cryid user may look into it) when it is missing."""
    if state_dir.is_dir():
        return
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(state_dir, 0o700)  # mkdir's mode is cut by the umask
    except OSError as exc:
        raise error(f"cannot create state directory {state_dir} ({exc}); set CRYID_STATE_DIR") from exc


def is_damage(exc: BaseException) -> bool:
    """True when SQLite says the file's content is damaged (not a permission or locking problem)."""
    low = str(exc).lower()
    return any(k in low for k in ("malformed", "not a database", "corrupt", "disk image"))


def sqlite_failure(path: Path, exc: BaseException, what: str) -> str:
    """One line for an SQLite or OS failure on ``path`` (``what``: registry, outbox) with the right fix."""
    text = " ".join((str(exc) or type(exc).__name__).split())
    low = text.lower()
    if is_damage(exc):
        fix = (
            f"the file is damaged: restore it from an export (`cryid enroll import`) or recover it with "
            f"`sqlite3 {path} .recover`"
        )
    elif isinstance(exc, PermissionError) or any(
        k in low for k in ("readonly", "read-only", "permission", "unable to open", "access")
    ):
        fix = (
            "check that the user running cryid may read and write it and its directory "
            f"(ls -l {path.parent}); its content is not the problem"
        )
    elif "locked" in low or "busy" in low:
        fix = "another cryid process holds it; try again in a moment"
    elif "full" in low:
        fix = "the disk is full; free some space"
    else:
        fix = "check the file and its directory"
    return f"{what} {path}: {text}; {fix}"


def foreign_tables(
    conn: sqlite3.Connection, own_table: str = "infants", versioned: bool = True
) -> str | None:
    """A description when the open file is another program's SQLite database, else None.

    Ours: empty (new), or holding ``own_table``; a ``versioned`` file (the registry, which sets
    ``user_version`` in the transaction that creates its tables) also has a non-zero ``user_version``.
    """
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    tables.discard("sqlite_sequence")
    if tables and (own_table not in tables or (versioned and version == 0)):
        shown = ", ".join(sorted(tables)[:5]) or "none"
        return f"an SQLite file with tables {shown}, user_version {version}"
    return None


def usable_vector(v: np.ndarray, dim: int | None) -> bool:
    """An embedding the scoring can use: ``dim`` finite values with a norm neither zero nor huge."""
    if (dim is not None and v.size != dim) or v.size == 0 or not np.isfinite(v).all():
        return False
    return MIN_VECTOR_NORM <= float(np.linalg.norm(v.astype(np.float64))) <= MAX_VECTOR_NORM
