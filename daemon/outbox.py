"""The outbox: every event is stored in SQLite before it is published and leaves only on PUBACK.

One file in the state directory (WAL journal). Rows are published oldest first. Bounded: when
``max_events`` rows wait, adding one more drops the oldest provisional ``expiration`` event; final
``episode`` events are dropped only when nothing else is left. Drops are counted (persistently) and
exported in the stats topic. An exclusive lock file keeps a second daemon off the same outbox.

A full disk (SQLite's ``database or disk is full``) does not stop the daemon: the outbox logs "disk
full" once, sets :attr:`Outbox.disk_full`, and keeps the newest ``memory_events`` events in memory,
where they are published and acknowledged like stored ones. Every ``disk_retry_s`` (and at each new
event) it tries to write them; when space returns they are stored and it says so. Events held in
memory are lost only if the daemon stops while the disk is still full (logged as an error).

Writes are committed without waiting for the disk (WAL, ``synchronous=NORMAL``: a commit survives a
crash of the daemon at once); with ``fsync`` the service's main thread calls :meth:`Outbox.sync`, which
fsyncs the WAL file, as soon as an event was added. So the event is on disk a few milliseconds after it
is committed, while it is being published: an fsync (milliseconds on a busy disk, tens on some cloud
disks) is no longer on the path from the end of a cry to its PUBLISH, and power lost before the fsync
loses no more than before (the event was either published or not stored yet either way).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from cryid.daemon.config import OutboxSettings
from cryid.enrollment.sqlite_files import foreign_tables, is_damage, make_private_dir, sqlite_failure
from cryid.models.errors import CryidError

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_kind ON events (kind, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class OutboxError(CryidError):
    """The outbox cannot be opened (locked by another daemon, unwritable state directory)."""


def is_disk_full(exc: BaseException) -> bool:
    """SQLite's SQLITE_FULL (``database or disk is full``) or an ENOSPC from the file system."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


@dataclass(frozen=True)
class OutboxItem:
    """One stored event waiting for the broker's acknowledgement."""

    seq: int
    event_id: str
    kind: str
    topic: str
    payload: str


class Outbox:
    """SQLite outbox shared by the pipeline thread (add), the MQTT thread (remove) and the main thread."""

    def __init__(self, path: Path, settings: OutboxSettings | None = None) -> None:
        self.path = Path(path)
        self.settings = settings = settings or OutboxSettings()
        make_private_dir(self.path.parent, OutboxError)
        try:
            lock_path = self.path.with_suffix(self.path.suffix + ".lock")
            self._lock_fh = open(os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600), "a+")  # noqa: SIM115
        except OSError as exc:
            raise OutboxError(
                f"cannot create the outbox in {self.path.parent} ({exc.strerror}); set CRYID_STATE_DIR "
                "to a writable directory"
            ) from exc
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock_fh.close()
            raise OutboxError(
                f"{self.path} is in use by another cryid daemon; stop it or give this one its own "
                "CRYID_STATE_DIR"
            ) from exc
        self._lock = threading.Lock()
        self._memory: deque[OutboxItem] = deque()  # events that could not be stored (disk full)
        self._unremoved: set[str] = set()  # acknowledged, but the DELETE failed (disk full)
        self._unsaved_drops = 0  # drops of memory events, not yet added to the stored counter
        self._next_try = 0.0
        self._memory_drops = 0  # events dropped from memory in this full-disk spell
        self._unsynced = False  # rows committed but not fsync'ed yet (see sync)
        self.disk_full = False
        self.disk_error: str | None = None
        try:
            self._open_db()
        except OutboxError:
            self._lock_fh.close()
            raise
        except sqlite3.DatabaseError as exc:
            if not is_damage(exc):
                self._lock_fh.close()
                raise OutboxError(sqlite_failure(self.path, exc, "outbox")) from exc
            self._set_aside(exc)  # the daemon must start: a damaged outbox is moved aside, not fatal
            self._open_db()
        if self._size:
            logger.info("outbox %s holds %d unacknowledged events from before", self.path, self._size)

    def _open_db(self) -> None:
        created = not self.path.exists()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
        try:
            if created:
                os.chmod(self.path, 0o600)  # events name babies: only the cryid user may read them
            foreign = foreign_tables(self._db, own_table="events", versioned=False)
            if foreign is not None:
                raise OutboxError(
                    f"{self.path} is not a cryid outbox ({foreign}); it was left untouched: point "
                    "outbox.filename or CRYID_STATE_DIR elsewhere"
                )
            check = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed ({check})")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # fsync off the publish path: see sync()
            self._db.executescript(_SCHEMA)
            self._size = int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])
            row = self._db.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()
            self._dropped = int(row[0]) if row else 0
        except BaseException:
            self._db.close()
            raise

    def _set_aside(self, exc: BaseException) -> None:
        """Move a damaged outbox (with its -wal and -shm) to ``<name>.corrupt-<UTC time>`` and say so."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                os.replace(src, Path(str(aside) + suffix))
        logger.error(
            "outbox %s is damaged (%s); moved it aside to %s and started a new one: the events it held "
            "were not published (recover them with `sqlite3 %s .recover` if needed)",
            self.path, " ".join(str(exc).split()), aside, aside,
        )

    @classmethod
    def open(cls, state_dir: Path, settings: OutboxSettings | None = None) -> Outbox:
        settings = settings or OutboxSettings()
        return cls(Path(state_dir).expanduser() / settings.filename, settings)

    @property
    def dropped(self) -> int:
        """Events dropped because the outbox was full, over the outbox's lifetime."""
        return self._dropped

    def size(self) -> int:
        """Events waiting for an acknowledgement (stored, and held in memory while the disk is full)."""
        return self._size - len(self._unremoved) + len(self._memory)

    @property
    def memory_size(self) -> int:
        """Events held in memory because the disk is full."""
        return len(self._memory)

    def add(self, event_id: str, kind: str, topic: str, payload: str) -> list[str]:
        """Store an event (durably, before it is published); returns the ids dropped to make room.

        On a full disk the event is kept in memory instead (see the module docstring)."""
        row = (event_id, kind, topic, payload, time.time())
        with self._lock:
            held = len(self._memory)
            try:  # while the disk is full, the events held in memory go first, in the same transaction
                dropped = self._insert_locked([*self._memory_rows(), row])
            except sqlite3.Error as exc:
                if not is_disk_full(exc):
                    raise
                self._went_full(exc)
            else:
                self._recovered(held)
                self._log_dropped(dropped)
                return dropped
            dropped = self._hold_locked(OutboxItem(-1, event_id, kind, topic, payload))
        if dropped:  # the first drop of a full-disk spell is a warning, the rest are counted (stats)
            first = self._memory_drops == len(dropped)
            (logger.warning if first else logger.debug)(
                "the disk is full and %d events wait in memory: dropped the oldest (%s); %d dropped in all",
                self.settings.memory_events,
                ", ".join(dropped),
                self._dropped,
            )
        return dropped

    def _insert_locked(self, rows: list[tuple[str, str, str, str, float]]) -> list[str]:
        """Insert ``rows`` in one transaction, dropping the oldest to stay within the bound."""
        dropped: list[str] = []
        size = self._size
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for row in rows:
                while size >= self.settings.max_events:
                    old = self._db.execute(
                        "SELECT seq, event_id FROM events WHERE kind='expiration' ORDER BY seq LIMIT 1"
                    ).fetchone() or self._db.execute(
                        "SELECT seq, event_id FROM events ORDER BY seq LIMIT 1"
                    ).fetchone()
                    self._db.execute("DELETE FROM events WHERE seq=?", (old[0],))
                    dropped.append(str(old[1]))
                    size -= 1
                self._db.execute(
                    "INSERT OR IGNORE INTO events(event_id, kind, topic, payload, created_at) "
                    "VALUES(?,?,?,?,?)",
                    row,
                )
                size += 1
            for event_id in self._unremoved:  # acknowledged while the disk was full
                self._db.execute("DELETE FROM events WHERE event_id=?", (event_id,))
            if dropped or self._unsaved_drops:
                self._db.execute(
                    "INSERT INTO meta(key, value) VALUES('dropped', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
                    (len(dropped) + self._unsaved_drops,),
                )
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # SQLite already rolled back after some errors (disk full)
                self._db.execute("ROLLBACK")
            raise
        self._unremoved.clear()
        self._unsaved_drops = 0
        self._unsynced = True
        self._size = int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])
        self._dropped += len(dropped)
        return dropped

    def _log_dropped(self, dropped: list[str]) -> None:
        if dropped:
            logger.warning(
                "outbox full (%d events): dropped %d oldest (%s); %d dropped in all",
                self.settings.max_events,
                len(dropped),
                ", ".join(dropped),
                self._dropped,
            )

    # disk full ----------------------------------------------------------------------------------
    def _went_full(self, exc: BaseException) -> None:
        self._next_try = time.monotonic() + self.settings.disk_retry_s
        if self.disk_full:
            return
        self.disk_full = True
        self.disk_error = str(exc)
        self._memory_drops = 0
        logger.warning(
            "disk full: cannot write the outbox %s (%s); keeping the newest %d events in memory and "
            "retrying every %.0f s; free space in %s",
            self.path,
            exc,
            self.settings.memory_events,
            self.settings.disk_retry_s,
            self.path.parent,
        )

    def _hold_locked(self, item: OutboxItem) -> list[str]:
        """Keep ``item`` in memory; over the bound, drop the oldest (provisional first)."""
        dropped: list[str] = []
        while len(self._memory) >= self.settings.memory_events:
            victim = next((m for m in self._memory if m.kind == "expiration"), self._memory[0])
            self._memory.remove(victim)
            dropped.append(victim.event_id)
        self._memory.append(item)
        self._memory_drops += len(dropped)
        self._dropped += len(dropped)
        self._unsaved_drops += len(dropped)
        return dropped

    def retry(self) -> bool:
        """While the disk is full: try to store what waits in memory (at most every ``disk_retry_s``).

        Returns True when the outbox is writable (``disk_full`` clears with the first write that works:
        of the held events here, or of the next new event)."""
        with self._lock:
            if self.disk_full and time.monotonic() >= self._next_try:
                self._retry_locked()
            return not self.disk_full

    def _memory_rows(self) -> list[tuple[str, str, str, str, float]]:
        return [(m.event_id, m.kind, m.topic, m.payload, time.time()) for m in self._memory]

    def _retry_locked(self) -> None:
        if not self._memory and not self._unremoved:
            return  # nothing to write proves nothing: the next event tries
        held = len(self._memory)
        try:
            dropped = self._insert_locked(self._memory_rows())
        except sqlite3.Error as exc:
            if not is_disk_full(exc):
                raise
            self._next_try = time.monotonic() + self.settings.disk_retry_s
            return
        self._recovered(held)
        self._log_dropped(dropped)

    def _recovered(self, held: int) -> None:
        """A write went through: what was held in memory is stored (``_insert_locked`` committed it)."""
        self._memory.clear()
        if not self.disk_full:
            return
        self.disk_full = False
        self.disk_error = None
        logger.warning(
            "disk space is back: the outbox %s is written again (%d events from memory)", self.path, held
        )

    def pending(self, limit: int = 100, exclude: set[str] | frozenset[str] = frozenset()) -> list[OutboxItem]:
        """Oldest stored events not in ``exclude`` (the ones already in flight)."""
        if limit <= 0:
            return []
        with self._lock:
            skip = len(exclude) + len(self._unremoved)
            rows = self._db.execute(
                "SELECT seq, event_id, kind, topic, payload FROM events ORDER BY seq LIMIT ?",
                (limit + skip,),
            ).fetchall()
            items = [OutboxItem(int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4])) for r in rows]
            items += list(self._memory)[: limit + len(exclude)]
            unremoved = set(self._unremoved)
        return [it for it in items if it.event_id not in exclude and it.event_id not in unremoved][:limit]

    def sync(self) -> bool:
        """fsync the rows committed since the last call (with ``fsync``; the service's main thread calls it
        when an event was stored). True when it synced. A delete lost to a power cut republishes an event
        (at-least-once), so only additions ask for it."""
        if not self.settings.fsync or not self._unsynced:
            return False
        self._unsynced = False  # before the fsync: a commit during it asks for the next one
        for name in (f"{self.path}-wal", str(self.path)):  # the WAL holds the commits (none: checkpointed)
            try:
                fd = os.open(name, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return True
        return False

    def remove(self, event_id: str) -> bool:
        """The broker acknowledged ``event_id``: delete it. False when it was not (any longer) stored."""
        with self._lock:
            for item in self._memory:
                if item.event_id == event_id:
                    self._memory.remove(item)
                    return True
            if event_id in self._unremoved:
                return False
            try:
                cur = self._db.execute("DELETE FROM events WHERE event_id=?", (event_id,))
            except sqlite3.Error as exc:
                if not is_disk_full(exc):
                    raise
                self._went_full(exc)
                known = self._db.execute("SELECT 1 FROM events WHERE event_id=?", (event_id,)).fetchone()
                if known:
                    self._unremoved.add(event_id)  # deleted once the disk has room again
                return bool(known)
            if cur.rowcount:
                self._size -= cur.rowcount
            return bool(cur.rowcount)

    def event_ids(self) -> list[str]:
        """Ids of every waiting event, oldest first (tests, diagnostics)."""
        with self._lock:
            stored = [str(r[0]) for r in self._db.execute("SELECT event_id FROM events ORDER BY seq")]
            return [e for e in stored if e not in self._unremoved] + [m.event_id for m in self._memory]

    def close(self) -> None:
        with self._lock:
            if self.disk_full:
                self._retry_locked()
            if self._memory:
                logger.error(
                    "disk full: %d events held in memory could not be stored and are lost: %s",
                    len(self._memory),
                    ", ".join(m.event_id for m in self._memory),
                )
            self.sync()
            self._db.close()
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
        finally:
            self._lock_fh.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
