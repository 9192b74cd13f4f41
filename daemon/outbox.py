"""The outbox: every event is stored in SQLite before it is published and leaves only on PUBACK.

One file in the state directory (WAL journal). Rows are published oldest first. Bounded: when
``max_events`` rows wait, adding one more drops the oldest provisional ``expiration`` event; final
``episode`` events are dropped only when nothing else is left. Drops are counted (persistently) and
exported in the stats topic. An exclusive lock file keeps a second daemon off the same outbox.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
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
            self._db.execute(f"PRAGMA synchronous={'FULL' if self.settings.fsync else 'NORMAL'}")
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
        return self._size

    def add(self, event_id: str, kind: str, topic: str, payload: str) -> list[str]:
        """Store an event (durably, before it is published); returns the ids dropped to make room."""
        dropped: list[str] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                while self._size >= self.settings.max_events:
                    row = self._db.execute(
                        "SELECT seq, event_id FROM events WHERE kind='expiration' ORDER BY seq LIMIT 1"
                    ).fetchone() or self._db.execute(
                        "SELECT seq, event_id FROM events ORDER BY seq LIMIT 1"
                    ).fetchone()
                    self._db.execute("DELETE FROM events WHERE seq=?", (row[0],))
                    dropped.append(str(row[1]))
                    self._size -= 1
                if dropped:
                    self._db.execute(
                        "INSERT INTO meta(key, value) VALUES('dropped', ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
                        (len(dropped),),
                    )
                self._db.execute(
                    "INSERT OR IGNORE INTO events(event_id, kind, topic, payload, created_at) "
                    "VALUES(?,?,?,?,?)",
                    (event_id, kind, topic, payload, time.time()),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._size = int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])
            self._dropped += len(dropped)
        if dropped:
            logger.warning(
                "outbox full (%d events): dropped %d oldest (%s); %d dropped in all",
                self.settings.max_events,
                len(dropped),
                ", ".join(dropped),
                self._dropped,
            )
        return dropped

    def pending(self, limit: int = 100, exclude: set[str] | frozenset[str] = frozenset()) -> list[OutboxItem]:
        """Oldest stored events not in ``exclude`` (the ones already in flight)."""
        if limit <= 0:
            return []
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, event_id, kind, topic, payload FROM events ORDER BY seq LIMIT ?",
                (limit + len(exclude),),
            ).fetchall()
        items = [OutboxItem(int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4])) for r in rows]
        return [it for it in items if it.event_id not in exclude][:limit]

    def remove(self, event_id: str) -> bool:
        """The broker acknowledged ``event_id``: delete it. False when it was not (any longer) stored."""
        with self._lock:
            cur = self._db.execute("DELETE FROM events WHERE event_id=?", (event_id,))
            if cur.rowcount:
                self._size -= cur.rowcount
            return bool(cur.rowcount)

    def event_ids(self) -> list[str]:
        """Ids of every stored event, oldest first (tests, diagnostics)."""
        with self._lock:
            return [str(r[0]) for r in self._db.execute("SELECT event_id FROM events ORDER BY seq")]

    def close(self) -> None:
        with self._lock:
            self._db.close()
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
        finally:
            self._lock_fh.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
