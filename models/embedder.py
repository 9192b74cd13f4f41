"""Run-time embedder: NumPy front end + onnxruntime. No torch anywhere on this path.

``Embedder(model_dir)`` reads ``manifest.json``, checks the sha256 of ``model.onnx`` against it,
opens an onnxruntime session with the configured thread counts and warms it up. Each clip is run
at its own length (clips of equal length share one batch), so padding never changes an embedding:
``embed_batch(clips)[i] == embed(clips[i])``, exactly as speechbrain's ``encode_batch`` of that clip alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cryid.models.audio import AudioError
from cryid.models.config import EmbedderSettings
from cryid.models.frontend import Fbank
from cryid.models.manifest import ONNX_NAME, Manifest, ModelError, load_manifest, sha256_bytes

logger = logging.getLogger(__name__)

# ECAPA-TDNN's dilated convolutions reflect-pad up to 4 frames: shorter inputs cannot be embedded.
MIN_CLIP_MS = 100


class Embedder:
    """Embeds float32 mono clips with the ONNX model in ``model_dir``."""

    def __init__(self, model_dir: Path, settings: EmbedderSettings | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.settings = settings or EmbedderSettings()
        self.manifest: Manifest = load_manifest(self.model_dir)
        onnx_path = self.model_dir / ONNX_NAME
        if not onnx_path.is_file():
            raise ModelError(
                f"{onnx_path}: missing; re-export the model "
                f"with `cryid model export SRC --out {self.model_dir}`"
            )
        data = onnx_path.read_bytes()
        self.sha256 = sha256_bytes(data)
        if self.sha256 != self.manifest.onnx_sha256:
            raise ModelError(
                f"{onnx_path}: sha256 {self.sha256[:12]}... does not match the manifest's "
                f"{self.manifest.onnx_sha256[:12]}...; the file was changed or damaged, re-export the model"
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.settings.intra_op_threads
        opts.inter_op_num_threads = self.settings.inter_op_threads
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # No busy-waiting worker threads: the daemon shares the CPU with the audio callback and
        # the segmenter, and on a busy machine spinning makes every run slower (measured: 2x).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"{onnx_path}: onnxruntime cannot load it ({reason[:160]}); re-export the model"
            ) from exc
        self._input = self.manifest.input_name
        names = [i.name for i in self._session.get_inputs()]
        if names != [self._input]:
            raise ModelError(f"{onnx_path}: inputs {names} do not match the manifest's {self._input!r}")
        self.frontend = Fbank(self.manifest.frontend)
        self.dim = int(self.manifest.embedding_dim)
        self.sample_rate = int(self.manifest.frontend.sample_rate)
        self.min_samples = self.sample_rate * MIN_CLIP_MS // 1000
        if self.settings.warmup:
            rng = np.random.default_rng(0)
            self.embed(0.01 * rng.standard_normal(self.sample_rate).astype(np.float32))
        logger.info("embedder ready: %s (sha256 %s, %d-d)", self.model_dir, self.sha256[:12], self.dim)

    def _check(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
        if sample_rate != self.sample_rate:
            raise AudioError(
                f"audio at {sample_rate} Hz, the model expects {self.sample_rate} Hz; "
                "resample it first (cryid.models.audio.resample or load_audio)"
            )
        x = np.asarray(wav)
        if x.ndim != 1:
            raise AudioError(
                f"expected 1-D mono audio, got shape {x.shape}; down-mix it first (to_mono_float32)"
            )
        if x.shape[0] < self.min_samples:
            raise AudioError(
                f"clip of {x.shape[0]} samples is too short to embed; give at least {MIN_CLIP_MS} ms "
                f"({self.min_samples} samples)"
            )
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise AudioError("audio holds NaN or infinite samples")
        return x

    def _run(self, feats: np.ndarray) -> np.ndarray:
        out = self._session.run(None, {self._input: feats})[0]
        return np.asarray(out, dtype=np.float32)

    def embed(self, wav: np.ndarray, sample_rate: int = 16000) -> np.ndarray:
        """Embedding of one clip, shape (dim,), float32, not normalised."""
        x = self._check(wav, sample_rate)
        return self._run(self.frontend.features(x)[None])[0]

    def embed_batch(self, wavs: Sequence[np.ndarray], sample_rate: int = 16000) -> np.ndarray:
        """Embeddings of clips of any lengths, shape (n, dim); row i equals ``embed(wavs[i])``."""
        clips = [self._check(w, sample_rate) for w in wavs]
        out = np.zeros((len(clips), self.dim), dtype=np.float32)
        by_len: dict[int, list[int]] = {}
        for i, clip in enumerate(clips):
            by_len.setdefault(clip.shape[0], []).append(i)
        for idx in by_len.values():
            feats = np.stack([self.frontend.features(clips[i]) for i in idx])
            out[idx] = self._run(feats)
        return out
