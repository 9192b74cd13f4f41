"""The infant registry: one SQLite file in the state directory (WAL), written only by enrollment.

Tables: ``infants`` (who is in the ward), ``samples`` (each enrollment recording: where it came from,
its period, seconds of cry, optionally its audio) and ``embeddings`` (one row per cry expiration of a
sample, per model sha256, so embeddings of different models are never mixed). A baby's centroid for a
model is the re-normalised mean of its L2-normalised expiration embeddings (``cryid.models.scoring``).

The daemon reads through ``centroids``, ``needs_reenrollment`` and ``data_version``. Every write is
one ``BEGIN IMMEDIATE`` transaction, ``with registry.write() as tx: tx.insert_infant(...)``, so an
enrollment is all there or not there; this module (and ``episodes.py`` for its tables) holds every
SQL statement of the registry.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cryid.enrollment.config import RegistrySettings
from cryid.enrollment.episodes import MIGRATION as EPISODES_MIGRATION
from cryid.enrollment.episodes import EpisodeTables, EpisodeWrites
from cryid.enrollment.sqlite_files import foreign_tables, make_private_dir, sqlite_failure, usable_vector
from cryid.models.errors import CryidError
from cryid.models.scoring import centroid

logger = logging.getLogger(__name__)

BABY_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
PERIODS = ("birth", "discharge")
SOURCE_KINDS = ("file", "mic", "import")
STATUSES = ("active", "discharged")
MAX_NAME_CHARS = 200

# Each entry migrates from version i to i + 1 (PRAGMA user_version); never edit a released entry.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE infants (
            baby_id TEXT PRIMARY KEY,
            display_name TEXT NOT NULL DEFAULT '',
            room TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('active', 'discharged')),
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            discharged_at TEXT
        )""",
        """CREATE TABLE samples (
            sample_id INTEGER PRIMARY KEY AUTOINCREMENT,
            baby_id TEXT NOT NULL REFERENCES infants(baby_id) ON DELETE CASCADE,
            source_kind TEXT NOT NULL CHECK (source_kind IN ('file', 'mic', 'import')),
            source TEXT NOT NULL,
            period TEXT NOT NULL CHECK (period IN ('birth', 'discharge')),
            duration_s REAL NOT NULL,
            cry_s REAL NOT NULL,
            n_expirations INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            audio_flac BLOB
        )""",
        "CREATE INDEX samples_by_baby ON samples(baby_id)",
        """CREATE TABLE embeddings (
            sample_id INTEGER NOT NULL REFERENCES samples(sample_id) ON DELETE CASCADE,
            model_sha256 TEXT NOT NULL,
            expiration_index INTEGER NOT NULL,
            start_sample INTEGER NOT NULL,
            end_sample INTEGER NOT NULL,
            vector BLOB NOT NULL,
            PRIMARY KEY (sample_id, model_sha256, expiration_index)
        )""",
        "CREATE INDEX embeddings_by_model ON embeddings(model_sha256)",
    ),
    EPISODES_MIGRATION,  # episodes heard by the daemon, nurses' confirmations (enrollment/episodes.py)
)
SCHEMA_VERSION = len(MIGRATIONS)


class RegistryError(CryidError):
    """Bad registry input or state; the message names the problem and the fix."""


def check_baby_id(baby_id: str) -> str:
    """Return ``baby_id`` if it can be an MQTT topic level, else raise ``RegistryError``."""
    if not BABY_ID_PATTERN.fullmatch(baby_id or ""):
        raise RegistryError(
            f"baby id {baby_id!r} is not allowed: use 1-64 letters, digits, '_' or '-' "
            "(it becomes an MQTT topic level)"
        )
    return baby_id


def check_room(room: str) -> str:
    """Return ``room`` if it can be a room name (an MQTT topic level, like the daemon's ``room``)."""
    if not BABY_ID_PATTERN.fullmatch(room or ""):
        raise RegistryError(
            f"room {room!r} is not allowed: use 1-64 letters, digits, '_' or '-' (as the daemon's `room`)"
        )
    return room


def check_display_name(name: str) -> str:
    """Return ``name`` if it is short and printable (no terminal escapes), else raise ``RegistryError``."""
    if len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise RegistryError(
            f"display name {name[:40]!r}: use at most {MAX_NAME_CHARS} printable characters "
            "(no control characters)"
        )
    return name


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Infant:
    baby_id: str
    display_name: str
    room: str
    status: str
    created_at: str
    updated_at: str
    discharged_at: str | None


@dataclass(frozen=True)
class SampleFields:
    """What every enrollment sample records about its recording (stored or still to be written)."""

    source_kind: str
    source: str
    period: str
    duration_s: float
    cry_s: float
    n_expirations: int

    def __post_init__(self) -> None:
        if self.period not in PERIODS:
            raise RegistryError(f"period {self.period!r} is not one of {', '.join(PERIODS)}")
        if self.source_kind not in SOURCE_KINDS:
            raise RegistryError(f"source kind {self.source_kind!r} is not one of {', '.join(SOURCE_KINDS)}")


@dataclass(frozen=True)
class SampleInfo(SampleFields):
    """A stored sample, without its vectors and audio (see ``sample_embeddings``, ``sample_audio``)."""

    sample_id: int
    baby_id: str
    created_at: str
    has_audio: bool
    models: tuple[str, ...]  # sha256 of the models this sample has embeddings for


@dataclass(frozen=True)
class SampleEmbeddings:
    """Embeddings of one sample's expirations for one model: rows of ``vectors`` match the spans."""

    model_sha256: str
    vectors: np.ndarray  # (n, dim) float32
    start_samples: tuple[int, ...]
    end_samples: tuple[int, ...]

    def __post_init__(self) -> None:
        n = len(self.start_samples)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != n or len(self.end_samples) != n or n == 0:
            raise RegistryError("sample embeddings need one (dim,) vector per expiration span, at least one")


@dataclass(frozen=True)
class NewSample(SampleFields):
    """One enrollment recording, ready to be written (with its embeddings and, if kept, its audio)."""

    embeddings: SampleEmbeddings | None  # None only for an imported sample of a baby needing re-enrollment
    audio_flac: bytes | None = None
    created_at: str = field(default_factory=utc_now)


def _vector_blob(v: np.ndarray) -> bytes:
    return np.asarray(v, dtype="<f4").tobytes()


def _blob_vector(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype="<f4").astype(np.float32)


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path``, None when it is gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


class Registry(EpisodeTables):
    """The SQLite registry. Thread-safe (one connection behind a lock); use ``Registry.open``."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._lock = threading.RLock()
        self._version = 0
        self._last_pragma_version: int | None = None
        self._settings = RegistrySettings()
        self._identity = _file_identity(path)

    # ---------------------------------------------------------------- lifecycle
    @classmethod
    def open(cls, state_dir: Path, settings: RegistrySettings | None = None) -> Registry:
        """Open (creating and migrating when needed) the registry in ``state_dir``.

        A new state directory is made 0700 and a new registry file 0600 (they identify newborns). A file
        that is not a cryid registry (another program's SQLite file) is refused before anything is
        written to it, and is not switched to WAL.
        """
        settings = settings or RegistrySettings()
        state_dir = Path(state_dir).expanduser()
        make_private_dir(state_dir, RegistryError)
        path = state_dir / settings.filename
        created = not path.exists()
        try:
            timeout_s = settings.busy_timeout_ms / 1000
            conn = sqlite3.connect(
                str(path), isolation_level=None, check_same_thread=False, timeout=timeout_s
            )
        except sqlite3.DatabaseError as exc:
            raise RegistryError(sqlite_failure(path, exc, "registry")) from exc
        try:
            if created:
                os.chmod(path, 0o600)
            conn.execute(f"PRAGMA busy_timeout = {int(settings.busy_timeout_ms)}")
            foreign = foreign_tables(conn)
            if foreign is not None:
                raise RegistryError(
                    f"{path} is not a cryid registry ({foreign}); it was left untouched: point "
                    "registry.filename or CRYID_STATE_DIR at the cryid registry"
                )
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        except (sqlite3.DatabaseError, OSError) as exc:
            conn.close()
            raise RegistryError(sqlite_failure(path, exc, "registry")) from exc
        except BaseException:
            conn.close()
            raise
        registry = cls(conn, path)
        registry._settings = settings
        try:
            registry._migrate()
            registry.data_version()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise RegistryError(sqlite_failure(path, exc, "registry")) from exc
        except BaseException:
            conn.close()
            raise
        return registry

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def reopen_if_replaced(self) -> bool:
        """Reopen when the file was deleted or replaced (another inode) since it was opened.

        An open SQLite connection keeps reading a deleted file, so a daemon would go on identifying the
        babies of a registry that is gone. Returns True when it reopened (and ``data_version`` changed).
        """
        identity = _file_identity(self.path)
        if identity is not None and identity == self._identity:
            return False
        try:
            fresh = Registry.open(self.path.parent, self._settings)
        except RegistryError as exc:  # keep the open one; try again when the file changes again
            self._identity = identity
            logger.error("registry %s was replaced but cannot be reopened: %s", self.path, exc)
            return False
        with self._lock:
            self._conn.close()
            self._conn, self._identity = fresh._conn, fresh._identity
            self._last_pragma_version = None
            self._version += 1
        logger.warning(
            "registry %s was %s while open; reopened it (%d babies in it now)",
            self.path,
            "deleted" if identity is None else "replaced by another file",
            len(self.infants()),
        )
        return True

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def schema_version(self) -> int:
        with self._lock:
            return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise RegistryError(
                f"{self.path} has schema version {version}, newer than this cryid's {SCHEMA_VERSION}; "
                "upgrade cryid"
            )
        if version == SCHEMA_VERSION:
            return
        with self._transaction() as conn:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])  # another process may have won
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target - 1]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target}")
                logger.info("registry %s migrated to schema version %s", self.path, target)

    @contextmanager
    def _transaction(self, bump: bool = True) -> Iterator[sqlite3.Connection]:
        """One BEGIN IMMEDIATE transaction: committed on success, rolled back on any error."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.DatabaseError as exc:
                raise RegistryError(sqlite_failure(self.path, exc, "registry")) from exc
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise RegistryError(sqlite_failure(self.path, exc, "registry")) from exc
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            if bump:
                self._version += 1

    @contextmanager
    def write(self, bump: bool = True) -> Iterator[RegistryWrite]:
        """One write transaction (BEGIN IMMEDIATE), as a :class:`RegistryWrite` whose methods are its
        statements: committed when the block ends, rolled back (nothing written) on any error.

        ``bump=False``: this connection's ``data_version`` does not change (the daemon keeping its own
        episodes must not make itself reload the babies' references); other connections still see it."""
        with self._transaction(bump) as conn:
            tx = RegistryWrite(conn)
            try:
                yield tx
            finally:
                tx._conn = None

    # ---------------------------------------------------------------- daemon interface
    def data_version(self) -> int:
        """A number that changes whenever this or any other process commits a change."""
        with self._lock:
            pragma = int(self._conn.execute("PRAGMA data_version").fetchone()[0])
            if pragma != self._last_pragma_version:
                if self._last_pragma_version is not None:
                    self._version += 1
                self._last_pragma_version = pragma
            return self._version

    def centroids(
        self, model_sha256: str, room: str | None = None, dim: int | None = None
    ) -> dict[str, np.ndarray]:
        """Unit centroid of every ACTIVE baby that has embeddings for this model (in ``room`` if given).

        An embedding that cannot be used (not finite, zero or huge norm, or not ``dim`` long: a damaged
        or poisoned registry) is skipped with a warning naming the baby, so the others stay identified.
        Without ``dim``, the size most babies have is taken as the model's.
        """
        rows = self._query(
            """SELECT s.baby_id, e.vector FROM embeddings e
               JOIN samples s ON s.sample_id = e.sample_id
               JOIN infants i ON i.baby_id = s.baby_id
               WHERE e.model_sha256 = ?1 AND i.status = 'active' AND (?2 IS NULL OR i.room = ?2)
               ORDER BY s.baby_id, e.sample_id, e.expiration_index""",
            (model_sha256, room),
        )
        grouped: dict[str, list[np.ndarray]] = {}
        for baby_id, blob in rows:
            grouped.setdefault(baby_id, []).append(_blob_vector(blob))
        if dim is None and grouped:
            sizes = [v[0].size for v in grouped.values()]
            dim = max(set(sizes), key=lambda n: (sizes.count(n), n))
        out: dict[str, np.ndarray] = {}
        for baby_id, vectors in grouped.items():
            good = [v for v in vectors if usable_vector(v, dim)]
            if len(good) < len(vectors):
                logger.warning(
                    "registry %s: baby %s has %d of %d embeddings for model %s that cannot be used "
                    "(not %s values, not finite, or a zero or huge norm); %s",
                    self.path, baby_id, len(vectors) - len(good), len(vectors), model_sha256[:12], dim,
                    "skipped them" if good else "baby left out: re-enroll it",
                )
            if good:
                out[baby_id] = centroid(np.stack(good))
        return out

    def needs_reenrollment(self, model_sha256: str, room: str | None = None) -> list[str]:
        """ACTIVE babies (in ``room`` if given) with no embedding for this model (enrolled with another
        model, audio not kept)."""
        rows = self._query(
            """SELECT i.baby_id FROM infants i
               WHERE i.status = 'active' AND (?2 IS NULL OR i.room = ?2) AND NOT EXISTS (
                   SELECT 1 FROM samples s JOIN embeddings e ON e.sample_id = s.sample_id
                   WHERE s.baby_id = i.baby_id AND e.model_sha256 = ?1)
               ORDER BY i.baby_id""",
            (model_sha256, room),
        )
        return [r[0] for r in rows]

    # ---------------------------------------------------------------- reads
    def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._conn.execute(sql, tuple(params)).fetchall()
            except sqlite3.DatabaseError as exc:
                raise RegistryError(sqlite_failure(self.path, exc, "registry")) from exc

    def get_infant(self, baby_id: str) -> Infant | None:
        rows = self._query(
            "SELECT baby_id, display_name, room, status, created_at, updated_at, discharged_at "
            "FROM infants WHERE baby_id = ?",
            (baby_id,),
        )
        return Infant(*rows[0]) if rows else None

    def require_infant(self, baby_id: str) -> Infant:
        infant = self.get_infant(check_baby_id(baby_id))
        if infant is None:
            raise RegistryError(f"baby {baby_id!r} is not enrolled; see `cryid enroll list`")
        return infant

    def infants(self) -> list[Infant]:
        rows = self._query(
            "SELECT baby_id, display_name, room, status, created_at, updated_at, discharged_at "
            "FROM infants ORDER BY baby_id"
        )
        return [Infant(*r) for r in rows]

    def samples(self, baby_id: str | None = None) -> list[SampleInfo]:
        rows = self._query(
            """SELECT s.source_kind, s.source, s.period, s.duration_s, s.cry_s, s.n_expirations,
                      s.sample_id, s.baby_id, s.created_at, s.audio_flac IS NOT NULL,
                      (SELECT group_concat(DISTINCT e.model_sha256) FROM embeddings e
                       WHERE e.sample_id = s.sample_id)
               FROM samples s WHERE (?1 IS NULL OR s.baby_id = ?1) ORDER BY s.baby_id, s.sample_id""",
            (baby_id,),
        )
        return [
            SampleInfo(*r[:9], has_audio=bool(r[9]), models=tuple(sorted(r[10].split(","))) if r[10] else ())
            for r in rows
        ]

    def sample_vectors(self, baby_id: str, model_sha256: str) -> np.ndarray:
        """All expiration embeddings of one baby for one model, shape (n, dim) (n may be 0)."""
        rows = self._query(
            """SELECT e.vector FROM embeddings e JOIN samples s ON s.sample_id = e.sample_id
               WHERE s.baby_id = ? AND e.model_sha256 = ? ORDER BY e.sample_id, e.expiration_index""",
            (baby_id, model_sha256),
        )
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([_blob_vector(r[0]) for r in rows])

    def sample_audio(self, sample_id: int) -> bytes | None:
        rows = self._query("SELECT audio_flac FROM samples WHERE sample_id = ?", (sample_id,))
        return rows[0][0] if rows else None

    def sample_embeddings(self, sample_id: int, model_sha256: str) -> SampleEmbeddings | None:
        rows = self._query(
            "SELECT start_sample, end_sample, vector FROM embeddings "
            "WHERE sample_id = ? AND model_sha256 = ? ORDER BY expiration_index",
            (sample_id, model_sha256),
        )
        if not rows:
            return None
        return SampleEmbeddings(
            model_sha256,
            np.stack([_blob_vector(r[2]) for r in rows]),
            tuple(int(r[0]) for r in rows),
            tuple(int(r[1]) for r in rows),
        )

    def integrity_check(self) -> str:
        return str(self._query("PRAGMA integrity_check")[0][0])


class RegistryWrite(EpisodeWrites):
    """The statements of one open write transaction (``with registry.write() as tx``); usable only
    inside that block. Each method is one change; the block commits them all or none."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn: sqlite3.Connection | None = conn

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("a registry write was used after its transaction ended")
        return self._conn

    def _execute(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Cursor:
        return self._connection().execute(sql, tuple(params))

    # ---------------------------------------------------------------- reads, as this transaction sees them
    def has_infant(self, baby_id: str) -> bool:
        return self._execute("SELECT 1 FROM infants WHERE baby_id = ?", (baby_id,)).fetchone() is not None

    def infant_status(self, baby_id: str) -> str | None:
        """The baby's status, None when it is not enrolled."""
        row = self._execute("SELECT status FROM infants WHERE baby_id = ?", (baby_id,)).fetchone()
        return None if row is None else str(row[0])

    # ---------------------------------------------------------------- infants
    def insert_infant(self, baby_id: str, display_name: str, room: str, status: str = "active") -> None:
        check_baby_id(baby_id)
        check_room(room)
        if status not in STATUSES:
            raise RegistryError(f"status {status!r} is not one of {', '.join(STATUSES)}")
        check_display_name(display_name)
        now = utc_now()
        self._execute(
            "INSERT INTO infants (baby_id, display_name, room, status, created_at, updated_at, "
            "discharged_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (baby_id, display_name, room, status, now, now, now if status == "discharged" else None),
        )

    def set_times(self, baby_id: str, created_at: str, updated_at: str, discharged_at: str | None) -> None:
        """Keep the times a baby had elsewhere (an imported registry)."""
        self._execute(
            "UPDATE infants SET created_at = ?, updated_at = ?, discharged_at = ? WHERE baby_id = ?",
            (created_at, updated_at, discharged_at, baby_id),
        )

    def touch_infant(self, baby_id: str) -> None:
        self._execute("UPDATE infants SET updated_at = ? WHERE baby_id = ?", (utc_now(), baby_id))

    def delete_infant(self, baby_id: str) -> bool:
        """Delete a baby with its samples and embeddings (cascade); False if it was not there."""
        return self._execute("DELETE FROM infants WHERE baby_id = ?", (baby_id,)).rowcount > 0

    def set_status(self, baby_id: str, status: str) -> None:
        if status not in STATUSES:
            raise RegistryError(f"status {status!r} is not one of {', '.join(STATUSES)}")
        now = utc_now()
        self._execute(
            "UPDATE infants SET status = ?, updated_at = ?, discharged_at = ? WHERE baby_id = ?",
            (status, now, now if status == "discharged" else None, baby_id),
        )

    def set_room(self, baby_id: str, room: str) -> str:
        """Move a baby to ``room``; returns its previous room. ``RegistryError`` (inside the
        transaction, so nothing changes) for a bad room name or a baby that is not enrolled."""
        check_baby_id(baby_id)
        check_room(room)
        row = self._execute("SELECT room FROM infants WHERE baby_id = ?", (baby_id,)).fetchone()
        if row is None:
            raise RegistryError(f"baby {baby_id!r} is not enrolled; see `cryid enroll list`")
        if row[0] != room:
            self._execute(
                "UPDATE infants SET room = ?, updated_at = ? WHERE baby_id = ?", (room, utc_now(), baby_id)
            )
        return str(row[0])

    # ---------------------------------------------------------------- samples and embeddings
    def insert_sample(self, baby_id: str, sample: NewSample) -> int:
        """Write one sample with its embeddings; returns its sample id."""
        cur = self._execute(
            "INSERT INTO samples (baby_id, source_kind, source, period, duration_s, cry_s, n_expirations, "
            "created_at, audio_flac) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                baby_id,
                sample.source_kind,
                sample.source,
                sample.period,
                float(sample.duration_s),
                float(sample.cry_s),
                int(sample.n_expirations),
                sample.created_at,
                sample.audio_flac,
            ),
        )
        sample_id = int(cur.lastrowid or 0)
        if sample.embeddings is not None:
            self.insert_embeddings(sample_id, sample.embeddings)
        return sample_id

    def insert_embeddings(self, sample_id: int, emb: SampleEmbeddings) -> None:
        """Set one sample's embeddings for ``emb``'s model (replacing any it had for that model)."""
        self._execute(
            "DELETE FROM embeddings WHERE sample_id = ? AND model_sha256 = ?", (sample_id, emb.model_sha256)
        )
        self._connection().executemany(
            "INSERT INTO embeddings (sample_id, model_sha256, expiration_index, start_sample, end_sample, "
            "vector) VALUES (?, ?, ?, ?, ?, ?)",
            [
                (sample_id, emb.model_sha256, i, int(s), int(e), _vector_blob(v))
                for i, (s, e, v) in enumerate(
                    zip(emb.start_samples, emb.end_samples, emb.vectors, strict=True)
                )
            ],
        )

    def reembed_sample(self, sample_id: int, emb: SampleEmbeddings, cry_s: float) -> bool:
        """Replace a sample's embeddings for ``emb``'s model and its cry figures; False (nothing
        written) when the sample is gone."""
        if self._execute("SELECT 1 FROM samples WHERE sample_id = ?", (sample_id,)).fetchone() is None:
            return False
        self.insert_embeddings(sample_id, emb)
        self._execute(
            "UPDATE samples SET cry_s = ?, n_expirations = ? WHERE sample_id = ?",
            (cry_s, len(emb.start_samples), sample_id),
        )
        return True
