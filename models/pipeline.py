"""The one file path: segment a whole buffer into expirations and embed each one.

Enrollment and evaluation call ``embed_expirations``; the daemon runs the same ``Segmenter`` and
``Embedder`` incrementally on the live stream, so a file and the microphone are cut and embedded alike.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from cryid.models.audio import SAMPLE_RATE, AudioError
from cryid.models.config import SegmenterSettings
from cryid.models.segmenter import Expiration, segment

if TYPE_CHECKING:  # pragma: no cover
    from cryid.models.embedder import Embedder

logger = logging.getLogger(__name__)

BATCH_SIZE = 16
"""Expirations embedded per ``embed_batch`` call (bounds the padded batch's memory)."""


class BatchEmbedder(Protocol):
    """What ``embed_expirations`` needs of ``cryid.models.embedder.Embedder``."""

    def embed_batch(self, wavs: Sequence[np.ndarray], sample_rate: int = SAMPLE_RATE) -> np.ndarray: ...


@dataclass(frozen=True)
class EmbeddedExpiration:
    """An expiration and its embedding (float32, not normalised)."""

    expiration: Expiration
    embedding: np.ndarray = field(repr=False)


def embed_expirations(
    wav: np.ndarray, settings: SegmenterSettings, embedder: Embedder | BatchEmbedder
) -> list[EmbeddedExpiration]:
    """Segment ``wav`` (float32 mono 16 kHz) and embed every expiration, in stream order.

    Returns an empty list when the audio holds no expiration (silence, noise, too short).
    """
    arr = np.asarray(wav)
    if arr.ndim != 1:
        raise AudioError(f"expected mono audio (1-D), got shape {arr.shape}; down-mix with load_audio")
    if arr.size and not np.all(np.isfinite(arr)):
        raise AudioError("audio holds NaN or infinite samples; re-encode the recording")
    expirations = segment(arr.astype(np.float32, copy=False), settings)
    out: list[EmbeddedExpiration] = []
    for i in range(0, len(expirations), BATCH_SIZE):
        batch = expirations[i : i + BATCH_SIZE]
        embs = np.asarray(embedder.embed_batch([e.audio for e in batch], SAMPLE_RATE), dtype=np.float32)
        if embs.ndim != 2 or embs.shape[0] != len(batch):
            raise ValueError(f"embedder returned shape {embs.shape} for {len(batch)} expirations")
        out.extend(EmbeddedExpiration(e, emb) for e, emb in zip(batch, embs, strict=True))
    logger.debug("embedded %d expirations from %.1f s of audio", len(out), arr.size / SAMPLE_RATE)
    return out
