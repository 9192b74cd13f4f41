"""``cryid model export``: speechbrain ECAPA-TDNN to ``model.onnx`` + ``manifest.json`` (torch lazily).

The ONNX graph maps normalised features (batch, frames, n_mels) to the embedding (batch, dim):
the ECAPA-TDNN, plus a learned back-end ``(embedding - mean) @ transform`` appended inside the
graph when one is given (or SRC holds ``backend.npz``). The NumPy front end (``frontend.Fbank``)
computes the features at run time. Before anything is written, the NumPy front end + ONNX model
are compared with speechbrain's ``encode_batch(wav, normalize=False)`` on a few clips; a model that
disagrees is refused. ``--quantize int8`` applies onnxruntime dynamic quantisation and records the
int8 model's agreement with fp32. The directory is built in a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryid.models.files import sha256_file
from cryid.models.frontend import Fbank
from cryid.models.manifest import (
    MANIFEST_NAME,
    ONNX_NAME,
    BackendInfo,
    BranchInfo,
    FrontendParams,
    Manifest,
    ModelError,
    ParityReport,
    QuantizationReport,
    TrainingInfo,
    write_manifest,
)
from cryid.models.scoring import cosine_rows
from cryid.models.training.backend import BACKEND_NAME, load_backend
from cryid.models.training.gmm_branch import BRANCH_NAME, GmmBranch, fuse, load_branch

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

OPSET = 17
PARITY_MIN_COSINE = 0.9999
INT8_MIN_COSINE = 0.99
CHECK_CLIPS_S = (0.7, 1.6, 3.3)
QUANTIZE_CHOICES = ("int8",)
TRAIN_INFO_NAME = "train_info.json"


def check_clips(sample_rate: int = 16000, durations_s: tuple[float, ...] = CHECK_CLIPS_S) -> list[np.ndarray]:
    """Deterministic cry-like test signals: a gliding harmonic tone with an envelope, plus noise."""
    rng = np.random.default_rng(1234)
    clips = []
    for i, dur in enumerate(durations_s):
        n = round(dur * sample_rate)
        t = np.arange(n) / sample_rate
        f0 = 380.0 + 60.0 * i + 120.0 * np.sin(2 * np.pi * (0.8 + 0.3 * i) * t)
        phase = 2 * np.pi * np.cumsum(f0) / sample_rate
        tone = sum((0.6 / k) * np.sin(k * phase + k) for k in range(1, 8))
        env = np.sin(np.pi * np.clip(t / dur, 0.0, 1.0)) ** 0.5
        clip = 0.3 * env * tone + 0.01 * rng.standard_normal(n)
        clips.append(clip.astype(np.float32))
    return clips


def _read_train_info(src_dir: Path) -> TrainingInfo | None:
    path = src_dir / TRAIN_INFO_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return TrainingInfo(
            command=data.get("command"),
            metrics={
                k: float(v) for k, v in (data.get("metrics") or {}).items() if isinstance(v, (int, float))
            },
        )
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelError(f"{path}: not a valid train_info.json ({exc}); fix or remove it") from exc


def frontend_params(clf: Any, src: str) -> FrontendParams:
    """The NumPy front end's parameters for a speechbrain model's ``compute_features`` + ``mean_var_norm``."""
    n_mels = int(getattr(clf.mods.compute_features.compute_fbanks, "n_mels", 80))
    norm = getattr(clf.mods, "mean_var_norm", None)
    if norm is None or norm.std_norm:
        raise ModelError(
            f"{src}: cryid's front end needs mean_var_norm = InputNormalization(std_norm=False) "
            "in hyperparams.yaml (sentence or global); this model has "
            + ("none" if norm is None else "std_norm=True")
        )
    if norm.norm_type == "sentence":
        return FrontendParams(n_mels=n_mels)
    if norm.norm_type == "global":
        mean = norm.glob_mean.detach().cpu().numpy().reshape(-1) if norm.count else np.zeros(0)
        if mean.shape != (n_mels,):
            raise ModelError(
                f"{src}: global mean_var_norm holds no {n_mels}-band mean (mean_var_norm.ckpt missing "
                "from the pretrainer?); nothing written"
            )
        return FrontendParams(
            n_mels=n_mels, normalization="global_mean", global_mean=tuple(float(v) for v in mean)
        )
    raise ModelError(f"{src}: mean_var_norm norm_type {norm.norm_type!r} is not supported (sentence, global)")


def _graph_module(
    embedding_model: torch.nn.Module,
    backend: tuple[np.ndarray, np.ndarray] | None,
    branch: GmmBranch | None = None,
    n_mels: int = 80,
) -> Any:
    import torch

    from cryid.models.training.gmm_branch import torch_module

    class OnnxEncoder(torch.nn.Module):
        """features (B, T, n_mels) -> embedding (B, D): ECAPA (+ back-end) (+ fused GMM branch)."""

        def __init__(self) -> None:
            super().__init__()
            self.ecapa = embedding_model
            self.has_backend = backend is not None
            if backend is not None:
                self.register_buffer("bk_mean", torch.from_numpy(backend[0]))
                self.register_buffer("bk_transform", torch.from_numpy(backend[1]))
            self.branch = torch_module(branch, n_mels) if branch is not None else None

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            # Explicit full lengths: with lengths=None speechbrain builds torch.ones(batch), which
            # the tracer would freeze to the dummy batch size.
            lengths = torch.ones_like(features[:, 0, 0])
            emb = self.ecapa(features, lengths).squeeze(1)
            if self.has_backend:
                emb = torch.matmul(emb - self.bk_mean, self.bk_transform)
            if self.branch is not None:
                b = self.branch(features)
                a = emb / torch.linalg.vector_norm(emb, dim=1, keepdim=True).clamp_min(1e-12)
                b = b / torch.linalg.vector_norm(b, dim=1, keepdim=True).clamp_min(1e-12)
                emb = torch.cat([a, b], dim=1) * (0.5**0.5)
            return emb

    return OnnxEncoder().eval()


def _onnx_export(module: Any, n_mels: int, path: Path) -> None:
    import torch

    # Batch 1: speechbrain's length_to_mask uses len(lengths) as a Python int, which the tracer
    # freezes; a (1, frames) mask broadcasts over any batch (every clip is unpadded, all-true mask).
    dummy = torch.randn(1, 150, n_mels)
    with torch.no_grad():
        torch.onnx.export(
            module,
            (dummy,),
            str(path),
            input_names=["features"],
            output_names=["embedding"],
            dynamic_axes={"features": {0: "batch", 1: "frames"}, "embedding": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _onnx_embed(sess: Any, feats: list[np.ndarray]) -> np.ndarray:
    return np.stack([sess.run(None, {"features": f[None]})[0][0] for f in feats])


def _check_batching(sess: Any, feats: np.ndarray, src: str) -> None:
    """A batch of three clips must give each clip's own embedding (dynamic batch axis really works)."""
    rng = np.random.default_rng(7)
    batch = np.stack(
        [feats, feats[::-1].copy(), feats + 0.1 * rng.standard_normal(feats.shape).astype(np.float32)]
    )
    together = sess.run(None, {"features": batch})[0]
    alone = np.concatenate([sess.run(None, {"features": b[None]})[0] for b in batch])
    if together.shape != alone.shape or not np.allclose(together, alone, rtol=1e-3, atol=1e-4):
        raise ModelError(
            f"{src}: exported graph does not batch (batch output {together.shape} differs "
            "from single clips); nothing written"
        )


def reference_embeddings(
    clf: Any, clips: list[np.ndarray], backend: tuple[np.ndarray, np.ndarray] | None
) -> np.ndarray:
    """speechbrain's ``encode_batch(wav, normalize=False)`` of each clip alone (+ the back-end)."""
    import torch

    out = []
    with torch.no_grad():
        for clip in clips:
            emb = clf.encode_batch(torch.from_numpy(clip)[None], normalize=False)[0, 0].numpy()
            if backend is not None:
                emb = (emb - backend[0]) @ backend[1]
            out.append(emb.astype(np.float32))
    return np.stack(out)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("cryid", "torch", "speechbrain", "onnx", "onnxruntime"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished directory into place; an existing ``out`` is replaced only with ``overwrite``."""
    if out.exists():
        if not overwrite:
            raise ModelError(f"{out}: already exists; choose another --out or pass --force to replace it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def export_model(
    src: str,
    out: Path,
    quantize: str | None = None,
    backend: Path | None = None,
    command: str | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Export ``src`` (speechbrain dir or hub id) to ``out``; returns the manifest written there."""
    from cryid.models.training.speechbrain_io import load_encoder_classifier, resolve_source

    out = Path(out)
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ModelError(f"--quantize {quantize}: unsupported; choose one of {', '.join(QUANTIZE_CHOICES)}")
    if out.exists() and not overwrite:
        raise ModelError(f"{out}: already exists; choose another --out or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out}: is a file; --out must be a directory")
    src_dir = resolve_source(src)
    if backend is None and (src_dir / BACKEND_NAME).is_file():
        backend = src_dir / BACKEND_NAME
    bk = load_backend(Path(backend)) if backend is not None else None
    affine = None if bk is None else (bk.mean, bk.transform)  # appended inside the graph
    branch_path = src_dir / BRANCH_NAME
    branch = load_branch(branch_path) if branch_path.is_file() else None
    if branch is not None and bk is None:
        raise ModelError(f"{src}: {BRANCH_NAME} is fused with a back-end's output, but there is no back-end")
    training = _read_train_info(src_dir)

    clf = load_encoder_classifier(str(src_dir))
    params = frontend_params(clf, src)
    n_mels = params.n_mels
    frontend = Fbank(params)
    clips = check_clips(params.sample_rate)
    feats = frontend.features_batch(clips)
    ref = reference_embeddings(clf, clips, None)
    if bk is not None:
        if bk.input_dim != ref.shape[1]:
            raise ModelError(
                f"{backend}: back-end expects {bk.input_dim}-d embeddings "
                f"but the model gives {ref.shape[1]}-d"
            )
        ref = (ref - bk.mean) @ bk.transform
    if branch is not None:
        ref = fuse(ref, np.stack([branch.embed(f) for f in feats]))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the model from the service user
    try:
        fp32_path = tmp / "model.fp32.onnx"
        from cryid.models.training.onnx_rewrite import convs_as_conv2d

        fast = convs_as_conv2d(clf.mods.embedding_model)
        try:
            _onnx_export(_graph_module(fast, affine, branch, n_mels), n_mels, fp32_path)
        except Exception as exc:  # the tracer/exporter raises many types; report one line
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            raise ModelError(
                f"{src}: torch.onnx.export failed ({type(exc).__name__}: {first}); nothing written"
            ) from exc
        sess = _session(fp32_path)
        fp32 = _onnx_embed(sess, feats)
        _check_batching(sess, feats[0], src)
        cos = cosine_rows(fp32, ref)
        parity = ParityReport(
            reference="speechbrain EncoderClassifier.encode_batch(wav, normalize=False)"
            + (" + back-end" if bk is not None else "")
            + (" + GMM branch (NumPy)" if branch is not None else ""),
            clips_s=[round(len(c) / params.sample_rate, 3) for c in clips],
            min_cosine=float(cos.min()),
            max_abs_diff=float(np.abs(fp32 - ref).max()),
            threshold=PARITY_MIN_COSINE,
        )
        logger.info(
            "export parity: min cosine %.6f, max abs diff %.3g", parity.min_cosine, parity.max_abs_diff
        )
        if not parity.min_cosine >= PARITY_MIN_COSINE:
            raise ModelError(
                f"{src}: exported model disagrees with speechbrain (min cosine {parity.min_cosine:.6f} "
                f"< {PARITY_MIN_COSINE}); nothing written; this model's layers are not exportable as is"
            )
        quant = None
        if quantize == "int8":
            from cryid.models.training.onnx_rewrite import SCHEME, convs_as_matmul, quantize_int8

            mm = convs_as_matmul(clf.mods.embedding_model)
            pre_path = tmp / "model.pre-int8.onnx"
            if mm is None:
                fp32_path.rename(pre_path)
            else:
                _onnx_export(_graph_module(mm, affine, branch, n_mels), n_mels, pre_path)
                fp32_path.unlink()
            quantize_int8(pre_path, tmp / ONNX_NAME)
            int8 = _onnx_embed(_session(tmp / ONNX_NAME), feats)
            qcos = cosine_rows(int8, fp32)
            quant = QuantizationReport(
                scheme=SCHEME
                if mm is not None
                else "onnxruntime quantize_dynamic, QInt8 weights (7-bit range) per tensor",
                min_cosine_to_fp32=float(qcos.min()),
                mean_cosine_to_fp32=float(qcos.mean()),
                fp32_sha256=sha256_file(pre_path),
                threshold=INT8_MIN_COSINE,
            )
            logger.info("int8 agreement with fp32: min cosine %.6f", quant.min_cosine_to_fp32)
            if not quant.min_cosine_to_fp32 >= INT8_MIN_COSINE:
                raise ModelError(
                    f"{src}: int8 model disagrees with fp32 (min cosine {quant.min_cosine_to_fp32:.4f} "
                    f"< {INT8_MIN_COSINE}); nothing written; export without --quantize"
                )
            pre_path.unlink()
        else:
            fp32_path.rename(tmp / ONNX_NAME)
        manifest = Manifest(
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            source=src,
            export_command=command,
            frontend=params,
            embedding_dim=int(fp32.shape[1]),
            onnx_sha256=sha256_file(tmp / ONNX_NAME),
            opset=OPSET,
            parity=parity,
            quantization=quant,
            backend=None
            if bk is None
            else BackendInfo(
                file=str(backend),
                sha256=sha256_file(Path(backend)),
                input_dim=bk.input_dim,
                output_dim=bk.output_dim,
                kind=bk.kind,
            ),
            branch=None
            if branch is None
            else BranchInfo(
                file=str(branch_path),
                sha256=sha256_file(branch_path),
                components=branch.components,
                cepstra=branch.n_ceps,
                output_dim=branch.output_dim,
                members=branch.members,
            ),
            training=training,
            metrics=dict(training.metrics) if training is not None else {},
            versions=_versions(),
        )
        write_manifest(manifest, tmp)
        _place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s and %s in %s", ONNX_NAME, MANIFEST_NAME, out)
    return manifest
