"""Registry tables of the ward's episodes and the nurses' confirmations (the SQL; rules live in feedback.py).

``episodes``: every final crying episode the daemon heard (room, UTC times, model sha256, the decision
and its candidates as the final event's JSON, and the expiration embeddings: numbers, never audio),
kept for ``registry.episode_retention_days`` and then purged.

``confirmations``: a nurse's word on one episode: ``confirm`` (these cries are baby X: they join X's
confirmed reference) or ``reject`` (not baby X). Each row copies the episode's embeddings, so it
outlives the episode's purge, and keeps its provenance (who, when, through what, which episode).
``undo`` marks a row undone (who, when) instead of deleting it; undone rows count no more.

:class:`EpisodeTables` (reads) is a mixin of :class:`cryid.enrollment.registry.Registry`, which owns the
connection and its lock; :class:`EpisodeWrites` is a mixin of the registry's write transaction
(``with registry.write() as tx: tx.insert_episode(...)``).
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np

from cryid.models.scoring import centroid

if TYPE_CHECKING:
    from collections.abc import Sequence

FEEDBACK_KINDS = ("confirm", "reject")
FEEDBACK_VIA = ("cli", "mqtt")

# Migration 1 -> 2 of the registry (see registry.MIGRATIONS).
MIGRATION = (
    """CREATE TABLE episodes (
        episode_id TEXT PRIMARY KEY,
        room TEXT NOT NULL,
        started_at TEXT NOT NULL,
        ended_at TEXT NOT NULL,
        model_sha256 TEXT NOT NULL,
        decision TEXT NOT NULL,
        baby_id TEXT,
        best_baby_id TEXT,
        event TEXT NOT NULL,
        n_expirations INTEGER NOT NULL CHECK (n_expirations >= 1),
        dim INTEGER NOT NULL CHECK (dim >= 1),
        vectors BLOB NOT NULL,
        created_at TEXT NOT NULL
    )""",
    "CREATE INDEX episodes_by_end ON episodes(ended_at)",
    """CREATE TABLE confirmations (
        confirmation_id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL CHECK (kind IN ('confirm', 'reject')),
        episode_id TEXT NOT NULL,
        baby_id TEXT NOT NULL REFERENCES infants(baby_id) ON DELETE CASCADE,
        room TEXT NOT NULL,
        episode_started_at TEXT NOT NULL,
        episode_ended_at TEXT NOT NULL,
        model_sha256 TEXT NOT NULL,
        n_expirations INTEGER NOT NULL,
        dim INTEGER NOT NULL,
        vectors BLOB NOT NULL,
        created_by TEXT NOT NULL,
        via TEXT NOT NULL CHECK (via IN ('cli', 'mqtt')),
        created_at TEXT NOT NULL,
        undone_at TEXT,
        undone_by TEXT
    )""",
    "CREATE INDEX confirmations_by_baby ON confirmations(baby_id)",
    "CREATE INDEX confirmations_by_episode ON confirmations(episode_id)",
    # At most one live confirmation per episode, and one live rejection per (episode, baby).
    "CREATE UNIQUE INDEX one_live_confirm ON confirmations(episode_id) "
    "WHERE kind = 'confirm' AND undone_at IS NULL",
    "CREATE UNIQUE INDEX one_live_reject ON confirmations(episode_id, baby_id) "
    "WHERE kind = 'reject' AND undone_at IS NULL",
)


def iso_utc(t: datetime) -> str:
    """UTC ISO 8601 with milliseconds: one format, so stored times compare as strings."""
    if t.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def _blob(vectors: np.ndarray) -> bytes:
    return np.ascontiguousarray(vectors, dtype="<f4").tobytes()


def _vectors(blob: bytes, n: int, dim: int) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4").astype(np.float32).reshape(n, dim)


@dataclass(frozen=True)
class NewEpisode:
    """A final episode as the daemon heard it, ready to be kept."""

    episode_id: str
    room: str
    started_at: datetime
    ended_at: datetime
    model_sha256: str
    decision: str
    baby_id: str | None  # the baby named; None when unknown
    best_baby_id: str | None
    event_json: str  # the final CryEvent (score, margin, candidates, ...)
    vectors: np.ndarray  # (n_expirations, dim) float32

    def __post_init__(self) -> None:
        v = np.asarray(self.vectors)
        if v.ndim != 2 or v.shape[0] < 1 or v.shape[1] < 1:
            raise ValueError(f"episode {self.episode_id}: embeddings must be (n >= 1, dim), got {v.shape}")


@dataclass(frozen=True)
class Episode:
    """A kept episode (without its vectors; see :meth:`EpisodeTables.episode_vectors`)."""

    episode_id: str
    room: str
    started_at: str
    ended_at: str
    model_sha256: str
    decision: str
    baby_id: str | None
    best_baby_id: str | None
    event_json: str
    n_expirations: int
    created_at: str


@dataclass(frozen=True)
class Feedback:
    """One confirmation or rejection (``kind``) with its provenance."""

    confirmation_id: int
    kind: str
    episode_id: str
    baby_id: str
    room: str
    episode_started_at: str
    episode_ended_at: str
    model_sha256: str
    n_expirations: int
    created_by: str
    via: str
    created_at: str
    undone_at: str | None
    undone_by: str | None

    @property
    def live(self) -> bool:
        return self.undone_at is None


_EPISODE_COLS = (
    "episode_id, room, started_at, ended_at, model_sha256, decision, baby_id, best_baby_id, event, "
    "n_expirations, created_at"
)
_FEEDBACK_COLS = (
    "confirmation_id, kind, episode_id, baby_id, room, episode_started_at, episode_ended_at, model_sha256, "
    "n_expirations, created_by, via, created_at, undone_at, undone_by"
)


class EpisodeTables:
    """Reads and writes of ``episodes`` and ``confirmations`` (mixed into ``Registry``)."""

    _conn: sqlite3.Connection
    _lock: threading.RLock

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:  # Registry's
        raise NotImplementedError

    def centroids(  # Registry's
        self, model_sha256: str, room: str | None = None, dim: int | None = None
    ) -> dict[str, np.ndarray]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------ the daemon's references
    def references(
        self, model_sha256: str, room: str | None = None, dim: int | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``(birth, confirmed)`` unit centroids of the ACTIVE babies (of ``room``, or all) for this model:
        birth as ``Registry.centroids``, confirmed from the nurses' live confirmations; read in one
        snapshot. Only babies with a birth reference get a confirmed one (``ReferenceSet`` needs both)."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                birth = self.centroids(model_sha256, room=room, dim=dim)
                confirmed = self.confirmed_centroids(model_sha256, sorted(birth))
            finally:
                self._conn.execute("COMMIT")
        return birth, confirmed

    # ------------------------------------------------------------------------------ reads
    def get_episode(self, episode_id: str) -> Episode | None:
        rows = self._query(f"SELECT {_EPISODE_COLS} FROM episodes WHERE episode_id = ?", (episode_id,))
        return Episode(*rows[0]) if rows else None

    def episode_vectors(self, episode_id: str) -> np.ndarray | None:
        rows = self._query(
            "SELECT n_expirations, dim, vectors FROM episodes WHERE episode_id = ?", (episode_id,)
        )
        return _vectors(rows[0][2], rows[0][0], rows[0][1]) if rows else None

    def episodes(self, room: str | None = None, limit: int = 50) -> list[Episode]:
        """The latest kept episodes (newest first), of one room or all."""
        rows = self._query(
            f"SELECT {_EPISODE_COLS} FROM episodes WHERE (?1 IS NULL OR room = ?1) "
            "ORDER BY ended_at DESC, episode_id LIMIT ?2",
            (room, int(limit)),
        )
        return [Episode(*r) for r in rows]

    def waiting_episodes(self, room: str, since: datetime, limit: int) -> list[Episode]:
        """The cries of ``room`` still waiting for a nurse, newest first: kept episodes that named no baby
        (decision ``unknown``), ended at ``since`` or later, with no live confirmation or rejection (an
        undone one does not count)."""
        rows = self._query(
            f"SELECT {_EPISODE_COLS} FROM episodes e WHERE e.room = ?1 AND e.decision = 'unknown' "
            "AND e.ended_at >= ?2 AND NOT EXISTS (SELECT 1 FROM confirmations c "
            "WHERE c.episode_id = e.episode_id AND c.undone_at IS NULL) "
            "ORDER BY e.ended_at DESC, e.episode_id LIMIT ?3",
            (room, iso_utc(since), int(limit)),
        )
        return [Episode(*r) for r in rows]

    def answered_episodes(self, room: str, since: datetime) -> set[str]:
        """Ids of the episodes of ``room`` that ended at ``since`` or later and have a live confirmation or
        rejection (from the rows' copies: also of episodes purged meanwhile)."""
        rows = self._query(
            "SELECT DISTINCT episode_id FROM confirmations "
            "WHERE room = ? AND undone_at IS NULL AND episode_ended_at >= ?",
            (room, iso_utc(since)),
        )
        return {str(r[0]) for r in rows}

    def count_episodes(self) -> int:
        return int(self._query("SELECT count(*) FROM episodes")[0][0])

    def get_feedback(self, confirmation_id: int) -> Feedback | None:
        rows = self._query(
            f"SELECT {_FEEDBACK_COLS} FROM confirmations WHERE confirmation_id = ?", (int(confirmation_id),)
        )
        return Feedback(*rows[0]) if rows else None

    def feedback(self, baby_id: str | None = None, episode_id: str | None = None) -> list[Feedback]:
        """Confirmations and rejections (undone ones too), oldest first."""
        rows = self._query(
            f"SELECT {_FEEDBACK_COLS} FROM confirmations WHERE (?1 IS NULL OR baby_id = ?1) "
            "AND (?2 IS NULL OR episode_id = ?2) ORDER BY confirmation_id",
            (baby_id, episode_id),
        )
        return [Feedback(*r) for r in rows]

    def confirmed_centroids(
        self, model_sha256: str, baby_ids: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Per ACTIVE baby: the centroid of every live confirmed episode's embeddings for this model."""
        rows = self._query(
            """SELECT c.baby_id, c.n_expirations, c.dim, c.vectors FROM confirmations c
               JOIN infants i ON i.baby_id = c.baby_id
               WHERE c.kind = 'confirm' AND c.undone_at IS NULL AND c.model_sha256 = ?
                     AND i.status = 'active'
               ORDER BY c.baby_id, c.confirmation_id""",
            (model_sha256,),
        )
        wanted = None if baby_ids is None else set(baby_ids)
        grouped: dict[str, list[np.ndarray]] = {}
        for baby_id, n, dim, blob in rows:
            if wanted is None or baby_id in wanted:
                grouped.setdefault(baby_id, []).append(_vectors(blob, n, dim))
        return {b: centroid(np.concatenate(v)) for b, v in grouped.items()}


class EpisodeWrites:
    """Writes of ``episodes`` and ``confirmations`` inside one open transaction (mixed into
    ``cryid.enrollment.registry.RegistryWrite``, which holds the transaction's connection)."""

    def _execute(self, sql: str, params: Sequence[object] = ()) -> sqlite3.Cursor:  # RegistryWrite's
        raise NotImplementedError

    def insert_episode(self, ep: NewEpisode, created_at: datetime) -> None:
        v = np.asarray(ep.vectors, dtype=np.float32)
        self._execute(
            "INSERT INTO episodes (episode_id, room, started_at, ended_at, model_sha256, decision, baby_id, "
            "best_baby_id, event, n_expirations, dim, vectors, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                ep.episode_id, ep.room, iso_utc(ep.started_at), iso_utc(ep.ended_at), ep.model_sha256,
                ep.decision, ep.baby_id, ep.best_baby_id, ep.event_json, int(v.shape[0]), int(v.shape[1]),
                _blob(v), iso_utc(created_at),
            ),
        )  # fmt: skip

    def delete_episodes_before(self, cutoff: datetime) -> int:
        """Purge episodes that ended before ``cutoff``; confirmations keep their copied embeddings."""
        return self._execute("DELETE FROM episodes WHERE ended_at < ?", (iso_utc(cutoff),)).rowcount

    def insert_feedback(
        self, kind: str, episode_id: str, baby_id: str, by: str, via: str, at: datetime
    ) -> int:
        """Copy the kept episode ``episode_id`` into a new confirmation row; returns its id."""
        cur = self._execute(
            "INSERT INTO confirmations (kind, episode_id, baby_id, room, episode_started_at, "
            "episode_ended_at, model_sha256, n_expirations, dim, vectors, created_by, via, created_at) "
            "SELECT ?, episode_id, ?, room, started_at, ended_at, model_sha256, n_expirations, dim, vectors, "
            "?, ?, ? FROM episodes WHERE episode_id = ?",
            (kind, baby_id, by, via, iso_utc(at), episode_id),
        )
        if cur.rowcount != 1:
            raise sqlite3.IntegrityError(f"episode {episode_id} vanished inside the transaction")
        return int(cur.lastrowid or 0)

    def mark_feedback_undone(self, confirmation_id: int, by: str, at: datetime) -> bool:
        return (
            self._execute(
                "UPDATE confirmations SET undone_at = ?, undone_by = ? "
                "WHERE confirmation_id = ? AND undone_at IS NULL",
                (iso_utc(at), by, int(confirmation_id)),
            ).rowcount
            == 1
        )

    def live_feedback(self, episode_id: str) -> list[tuple[int, str, str]]:
        """(confirmation_id, kind, baby_id) of the live rows of one episode, as this transaction sees them."""
        return [
            (int(r[0]), str(r[1]), str(r[2]))
            for r in self._execute(
                "SELECT confirmation_id, kind, baby_id FROM confirmations "
                "WHERE episode_id = ? AND undone_at IS NULL ORDER BY confirmation_id",
                (episode_id,),
            )
        ]
