"""Files written whole or not at all, and their sha256: the one way cryid does either.

:func:`atomic_write` writes a temporary file beside the target (a fresh name, created exclusively),
fsyncs it and renames it over the target, so a reader or a crash sees the old file or the new one,
never a mix. A replaced file keeps its mode (a model directory read by the service user stays readable);
a private one is 0600. :func:`save_npz` writes a dict of arrays that way.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np

Content = bytes | str | Callable[[Path], object]


def atomic_write(path: Path, content: Content, *, private: bool = False, fsync: bool = True) -> Path:
    """Replace ``path`` with ``content``, atomically; returns ``path``.

    ``content``: bytes, text (written as UTF-8), or a function that writes the temporary file it is
    given (``torch.save``, ``np.savez``, ``Figure.savefig``; the name ends in ``path``'s suffix, so
    numpy and matplotlib keep it). ``private``: the file is 0600 whatever the umask (it identifies
    newborns); otherwise the permissions of the file it replaces (an admin's umask does not hide a
    model's manifest from the service user), or for a new file the mode any new file gets (0666 less
    the umask). ``fsync=False`` only for what can be made again (a cache): the data is then not forced
    to disk before the rename.
    On any error the temporary file is removed and the target left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")
    keep = None if private else _mode_of(path)
    # while being written, the temporary file is never more open than the file it replaces
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private or keep is not None else 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            if private:
                os.fchmod(fh.fileno(), 0o600)
            if isinstance(content, (bytes, str)):
                fh.write(content.encode("utf-8") if isinstance(content, str) else content)
        if callable(content):
            content(tmp)
        if keep is not None:
            os.chmod(tmp, keep)
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Replace ``path`` with an ``.npz`` of ``arrays``, atomically (see :func:`atomic_write`); returns it."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file, so numpy adds no ".npz" to the name
            np.savez(fh, **arrays)

    return atomic_write(path, write)


def _mode_of(path: Path) -> int | None:
    """The permissions (rwx bits) of ``path``, None when there is no such file."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode) & 0o777
    except FileNotFoundError:
        return None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
