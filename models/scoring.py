"""Cosine scoring: L2 normalisation, centroids, scores against many centroids.

One implementation for enrollment, the daemon and evaluation, so evaluation figures are the ward's.
"""

from __future__ import annotations

import numpy as np

_EPS = 1e-12


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Unit-length vectors along ``axis`` (float32); a zero vector stays zero."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return (x / np.maximum(norm, _EPS)).astype(np.float32)


def centroid(embeddings: np.ndarray) -> np.ndarray:
    """Re-normalised mean of the L2-normalised embeddings (rows)."""
    emb = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
    if emb.shape[0] == 0:
        raise ValueError("a centroid needs at least one embedding")
    return l2_normalize(l2_normalize(emb).mean(axis=0))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors."""
    return float(np.dot(l2_normalize(a), l2_normalize(b)))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``: shape (n,)."""
    return np.sum(l2_normalize(a) * l2_normalize(b), axis=-1)


def cosine_matrix(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Cosine similarity of every query row against every reference row: shape (n_queries, n_refs)."""
    q = l2_normalize(np.atleast_2d(queries))
    r = l2_normalize(np.atleast_2d(references))
    return q @ r.T


class ReferenceSet:
    """The enrolled babies' references: each baby's birth (enrollment) centroid and, once nurses have
    confirmed some of its cries on the ward, the centroid of those confirmed cries as a separate reference.

    A baby's score is ``w * cos(q, confirmed) + (1 - w) * cos(q, birth)`` when it has a confirmed
    reference (``w`` = ``confirmed_weight``: the ward's own cries weigh more than the birth recording),
    else ``cos(q, birth)``. Enrollment, the daemon and evaluation all score through this class.
    """

    def __init__(
        self,
        birth: dict[str, np.ndarray],
        confirmed: dict[str, np.ndarray] | None = None,
        confirmed_weight: float = 0.75,
    ) -> None:
        confirmed = confirmed or {}
        unknown = sorted(set(confirmed) - set(birth))
        if unknown:
            raise ValueError(f"confirmed references for babies without a birth reference: {unknown}")
        if not 0.0 <= confirmed_weight <= 1.0:
            raise ValueError(f"confirmed_weight must be within [0, 1], got {confirmed_weight}")
        self.ids = sorted(birth)
        self.confirmed_weight = float(confirmed_weight)
        if self.ids:
            self._birth = l2_normalize(np.stack([np.asarray(birth[i], np.float32).ravel() for i in self.ids]))
            dim = self._birth.shape[1]
            self._confirmed = np.zeros_like(self._birth)
            self._has = np.zeros(len(self.ids), dtype=bool)
            for k, i in enumerate(self.ids):
                if i in confirmed:
                    v = np.asarray(confirmed[i], np.float32).ravel()
                    if v.shape[0] != dim:
                        raise ValueError(f"{i}: confirmed reference has {v.shape[0]} dimensions, not {dim}")
                    self._confirmed[k] = l2_normalize(v)
                    self._has[k] = True
        else:
            self._birth = np.zeros((0, 0), np.float32)
            self._confirmed = self._birth
            self._has = np.zeros(0, dtype=bool)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int | None:
        return int(self._birth.shape[1]) if self.ids else None

    @property
    def has_confirmed(self) -> np.ndarray:
        """Per baby (order of ``ids``): whether it has a confirmed-cry reference."""
        return self._has

    @property
    def confirmed_ids(self) -> list[str]:
        return [i for i, h in zip(self.ids, self._has, strict=True) if h]

    def scores(self, query: np.ndarray) -> np.ndarray:
        """Score of one embedding against every baby (order of ``ids``)."""
        q = l2_normalize(np.asarray(query, np.float32).ravel())
        if not self.ids:
            return np.zeros(0, np.float32)
        if q.shape[0] != self._birth.shape[1]:
            raise ValueError(
                f"embedding has {q.shape[0]} dimensions but the references have {self._birth.shape[1]}; "
                "re-enroll the babies with the current model (cryid enroll reembed)"
            )
        s = self._birth @ q
        if self._has.any():
            w = self.confirmed_weight
            s = np.where(self._has, w * (self._confirmed @ q) + (1.0 - w) * s, s)
        return s.astype(np.float32)

    def score_matrix(self, queries: np.ndarray) -> np.ndarray:
        """Scores of many embeddings (rows) against every baby: shape (n_queries, len(ids))."""
        q = l2_normalize(np.atleast_2d(np.asarray(queries, np.float32)))
        if not self.ids:
            return np.zeros((q.shape[0], 0), np.float32)
        if q.shape[1] != self._birth.shape[1]:
            raise ValueError(
                f"embeddings have {q.shape[1]} dimensions but the references have {self._birth.shape[1]}"
            )
        s = q @ self._birth.T
        if self._has.any():
            w = self.confirmed_weight
            s = np.where(self._has[None, :], w * (q @ self._confirmed.T) + (1.0 - w) * s, s)
        return s.astype(np.float32)
