"""The embedders evaluation compares, the embedding cache and the throughput meter.

Two embedders give embeddings with one interface (``embed``, ``embed_batch``, ``sha256``, ``sample_rate``):
cryid's ONNX ``Embedder`` (no torch) and speechbrain's ``EncoderClassifier`` (the reference, torch
imported lazily). Both go through the same segmenter/pipeline code, so the ward protocol can run on
either. Embeddings are cached on disk per (model sha256, what was embedded), so a second run is immediate.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cryid.models.files import atomic_write, sha256_file
from cryid.models.manifest import ModelError

logger = logging.getLogger(__name__)


class EvalEmbedder(Protocol):
    """What evaluation needs from a model (``cryid.models.embedder.Embedder`` has exactly this)."""

    sha256: str
    sample_rate: int

    def embed(self, wav: np.ndarray, sample_rate: int = 16000) -> np.ndarray: ...

    def embed_batch(self, wavs: Sequence[np.ndarray], sample_rate: int = 16000) -> np.ndarray: ...


class SpeechbrainEmbedder:
    """speechbrain's ``EncoderClassifier.encode_batch(wav, normalize=False)``, one clip at a time.

    One clip per call (no padding), exactly as Ubenwa's evaluate notebook embeds a concatenation.
    A ``backend.npz`` in SRC (a learned back-end from ``cryid model train``) is applied after the
    network, and a ``gmm_branch.npz`` is fused with it, as ``cryid model export`` puts both inside the
    ONNX graph, so both embedders score alike.
    """

    def __init__(self, src: str) -> None:
        from cryid.models.frontend import Fbank
        from cryid.models.training.backend import BACKEND_NAME, load_backend
        from cryid.models.training.export import frontend_params
        from cryid.models.training.gmm_branch import BRANCH_NAME, load_branch
        from cryid.models.training.speechbrain_io import load_encoder_classifier, resolve_source

        local = resolve_source(src)
        self.source = src
        self.classifier = load_encoder_classifier(src)
        self.sample_rate = 16000
        digest = hashlib.sha256()
        for name in ("hyperparams.yaml", "embedding_model.ckpt", BACKEND_NAME, BRANCH_NAME):
            if (local / name).is_file():
                digest.update(sha256_file(local / name).encode())
        self.sha256 = digest.hexdigest()
        self.backend: tuple[np.ndarray, np.ndarray] | None = None
        if (local / BACKEND_NAME).is_file():
            backend = load_backend(local / BACKEND_NAME)
            self.backend = (backend.mean, backend.transform)
            logger.info("applying the learned back-end %s after the network", local / BACKEND_NAME)
        self.branch = load_branch(local / BRANCH_NAME) if (local / BRANCH_NAME).is_file() else None
        if self.branch is not None:
            if self.backend is None:
                raise ModelError(f"{src}: {BRANCH_NAME} is fused with a back-end's output, but there is none")
            self.frontend = Fbank(frontend_params(self.classifier, src))
            logger.info("fusing the GMM branch %s with the back-end's output", local / BRANCH_NAME)

    def embed(self, wav: np.ndarray, sample_rate: int = 16000) -> np.ndarray:
        import torch

        if sample_rate != self.sample_rate:
            raise ModelError(
                f"the speechbrain embedder expects {self.sample_rate} Hz audio, got {sample_rate} Hz"
            )
        with torch.no_grad():
            emb = self.classifier.encode_batch(torch.from_numpy(np.ascontiguousarray(wav)), normalize=False)
        out = emb.reshape(-1).cpu().numpy().astype(np.float32)
        if self.backend is not None:
            out = ((out - self.backend[0]) @ self.backend[1]).astype(np.float32)
        if self.branch is not None:
            from cryid.models.training.gmm_branch import fuse

            out = fuse(out, self.branch.embed(self.frontend.features(wav)))[0]
        return out

    def embed_batch(self, wavs: Sequence[np.ndarray], sample_rate: int = 16000) -> np.ndarray:
        if not wavs:
            raise ModelError("embed_batch needs at least one clip")
        return np.stack([self.embed(w, sample_rate) for w in wavs])


def load_eval_embedder(model_dir: Path | None, speechbrain_src: str | None, embedder_settings: Any) -> Any:
    """The ONNX ``Embedder`` for ``model_dir``, or the speechbrain reference for ``speechbrain_src``."""
    if speechbrain_src is not None:
        return SpeechbrainEmbedder(speechbrain_src)
    if model_dir is None:
        raise ModelError("no model given; pass --model DIR or --speechbrain SRC")
    from cryid.models.embedder import Embedder

    return Embedder(Path(model_dir), embedder_settings)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cryid/embeddings`` (``~/.cache/cryid/embeddings``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cryid" / "embeddings"


def file_fingerprint(path: Path) -> str:
    """Path, size and modification time: a changed file gets a new cache entry."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


class EmbeddingCache:
    """``.npy`` arrays under ``<dir>/<model sha256[:16]>/``, keyed by a text description of the input.

    Writes are atomic (temporary file + rename), so an interrupted run leaves no half-written entry.
    ``directory=None`` disables the cache.
    """

    def __init__(self, directory: Path | None, model_sha256: str) -> None:
        self.root = None if directory is None else Path(directory).expanduser() / model_sha256[:16]
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _path(root: Path, key: str) -> Path:
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
        return root / digest[:2] / f"{digest}.npy"

    def get_or_compute(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        if self.root is not None:
            path = self._path(self.root, key)
            if path.is_file():
                try:
                    value = np.load(path, allow_pickle=False)
                    self.hits += 1
                    return value
                except (OSError, ValueError):
                    logger.warning("unreadable cache entry %s; recomputing", path)
        value = np.asarray(compute(), dtype=np.float32)
        self.misses += 1
        if self.root is not None:
            path = self._path(self.root, key)
            path.parent.mkdir(parents=True, exist_ok=True)
            # a cache can be made again: not forced to disk, one fsync per entry would slow evaluation
            atomic_write(path, lambda tmp: np.save(tmp, value, allow_pickle=False), private=True, fsync=False)
        return value


@dataclass
class Throughput:
    """Seconds of audio embedded and the wall-clock seconds it took (cache hits excluded)."""

    audio_s: float = 0.0
    wall_s: float = 0.0
    items: int = 0
    _started: float = field(default=0.0, repr=False)

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self, audio_s: float) -> None:
        self.wall_s += time.perf_counter() - self._started
        self.audio_s += audio_s
        self.items += 1

    @property
    def realtime_factor(self) -> float | None:
        return self.audio_s / self.wall_s if self.wall_s > 0 else None

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "audio_s": round(self.audio_s, 3),
            "wall_s": round(self.wall_s, 3),
            "items": self.items,
            "audio_s_per_wall_s": None if self.realtime_factor is None else round(self.realtime_factor, 2),
        }
