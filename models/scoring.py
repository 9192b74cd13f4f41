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


def cosine_matrix(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Cosine similarity of every query row against every reference row: shape (n_queries, n_refs)."""
    q = l2_normalize(np.atleast_2d(queries))
    r = l2_normalize(np.atleast_2d(references))
    return q @ r.T
