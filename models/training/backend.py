"""Learned linear back-ends on speaker embeddings: LDA, WCCN and a PLDA-style weighting.

A back-end is one affine map, ``y = (x - mean) @ transform``, fitted on labelled training embeddings
(each infant a class). Cosine scoring after it is the classic Kaldi/WeSpeaker recipe
"centre, LDA, length-normalise, cosine". Because the map is affine, ``cryid.models.training.export``
can append it inside the ONNX graph (Sub + MatMul), so the runtime ``Embedder`` needs no change.

The file format, ``backend.npz``, holds ``mean`` (D,) and ``transform`` (D, K) as float32, plus a
``kind`` string and the eigenvalues (informative only). NumPy/SciPy only: no torch here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field
from scipy import linalg

from cryid.models.errors import CryidError
from cryid.models.files import save_npz
from cryid.models.strict import StrictModel

logger = logging.getLogger(__name__)

BACKEND_NAME = "backend.npz"


class BackendError(CryidError):
    """A back-end cannot be fitted or read (too few classes, wrong shapes, bad file)."""


class BackendSettings(StrictModel):
    """How the linear back-end is fitted on training embeddings."""

    kind: Literal["lda", "wccn", "center"] = Field(
        "lda",
        description="lda: linear discriminant analysis (within-class whitened, reduced to `dims`); "
        "wccn: within-class covariance normalisation (no reduction); center: subtract the mean only.",
    )
    dims: int = Field(20, ge=1, le=4096, description="Output dimensions of the LDA.")
    shrinkage: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Within-class covariance regularisation: Sw + shrinkage * mean(diag(Sw)) * I.",
    )
    weighting: Literal["none", "plda"] = Field(
        "none",
        description="plda: scale LDA dimension i by sqrt(l_i / (1 + l_i)) (l_i: between/within ratio), "
        "the cosine approximation of two-covariance PLDA; none: all dimensions equal.",
    )


@dataclass(frozen=True)
class Backend:
    """An affine map ``(x - mean) @ transform``."""

    mean: np.ndarray
    transform: np.ndarray
    kind: str | None = "lda"  # None: a file that does not say
    eigenvalues: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    def __post_init__(self) -> None:
        if self.mean.ndim != 1 or self.transform.ndim != 2 or self.transform.shape[0] != self.mean.shape[0]:
            raise BackendError(
                f"back-end shapes disagree: mean {self.mean.shape}, transform {self.transform.shape}; "
                "expected mean (D,) and transform (D, K)"
            )

    @property
    def input_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def output_dim(self) -> int:
        return int(self.transform.shape[1])

    def apply(self, embeddings: np.ndarray) -> np.ndarray:
        """Map (D,) or (N, D) embeddings to (K,) or (N, K)."""
        x = np.asarray(embeddings, dtype=np.float64)
        if x.shape[-1] != self.input_dim:
            raise BackendError(
                f"embedding size {x.shape[-1]} does not match the back-end input {self.input_dim}"
            )
        return ((x - self.mean) @ self.transform).astype(np.float32)

    def save(self, path: Path) -> Path:
        """Write ``backend.npz`` (atomically: a temporary file renamed into place)."""
        path = Path(path)
        if path.is_dir():
            path = path / BACKEND_NAME
        arrays = {
            "mean": self.mean.astype(np.float32),
            "transform": self.transform.astype(np.float32),
            "eigenvalues": self.eigenvalues.astype(np.float32),
        }
        if self.kind is not None:
            arrays["kind"] = np.array(self.kind)
        return save_npz(path, arrays)


def load_backend(path: Path) -> Backend:
    """Read a ``backend.npz`` (or the one inside a directory); ``BackendError`` names what is wrong."""
    path = Path(path)
    if path.is_dir():
        path = path / BACKEND_NAME
    if not path.is_file():
        raise BackendError(f"{path}: back-end file not found; pass an .npz written by `cryid model train`")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:  # zipfile/ValueError/OSError: not an npz
        raise BackendError(f"{path}: not a readable .npz back-end ({exc})") from exc
    if "mean" not in arrays or "transform" not in arrays:
        raise BackendError(f"{path}: a back-end needs arrays 'mean' (D,) and 'transform' (D, K)")
    mean = np.asarray(arrays["mean"], dtype=np.float32)
    transform = np.asarray(arrays["transform"], dtype=np.float32)
    if mean.ndim != 1 or transform.ndim != 2 or transform.shape[0] != mean.shape[0]:
        raise BackendError(
            f"{path}: back-end shapes mean {mean.shape} and transform {transform.shape} "
            "do not fit (D,) and (D, K)"
        )
    if not (np.isfinite(mean).all() and np.isfinite(transform).all()):
        raise BackendError(f"{path}: back-end holds NaN or infinite values")
    return Backend(
        mean=mean,
        transform=transform,
        kind=str(arrays["kind"]) if "kind" in arrays else None,
        eigenvalues=arrays.get("eigenvalues", np.zeros(0, dtype=np.float32)).astype(np.float32),
    )


def _scatter(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global mean, within-class and between-class scatter (both divided by N)."""
    mu = x.mean(axis=0)
    n, d = x.shape
    sw = np.zeros((d, d))
    sb = np.zeros((d, d))
    for lab in np.unique(labels):
        xc = x[labels == lab]
        mc = xc.mean(axis=0)
        dev = xc - mc
        sw += dev.T @ dev
        diff = (mc - mu)[:, None]
        sb += len(xc) * (diff @ diff.T)
    return mu, sw / n, sb / n


def fit_backend(
    embeddings: np.ndarray, labels: Sequence[str] | np.ndarray, settings: BackendSettings | None = None
) -> Backend:
    """Fit a back-end on (N, D) embeddings; ``labels`` names each row's class (infant)."""
    settings = settings or BackendSettings()
    x = np.asarray(embeddings, dtype=np.float64)
    lab = np.asarray(labels)
    if x.ndim != 2 or len(lab) != len(x):
        raise BackendError(f"need (N, D) embeddings with N labels; got {x.shape} and {len(lab)} labels")
    if not np.all(np.isfinite(x)):
        raise BackendError("embeddings contain NaN or inf; check the model and the audio")
    n_classes = len(np.unique(lab))
    if n_classes < 2:
        raise BackendError(f"a back-end needs at least 2 classes, got {n_classes}")
    mu, sw, sb = _scatter(x, lab)
    d = x.shape[1]
    if settings.kind == "center":
        return Backend(mean=mu.astype(np.float32), transform=np.eye(d, dtype=np.float32), kind="center")
    ridge = settings.shrinkage * max(float(np.mean(np.diag(sw))), 1e-12)
    sw_reg = sw + ridge * np.eye(d)
    if settings.kind == "wccn":
        # y = x @ B with B B^T = Sw^-1: the within-class covariance becomes the identity.
        chol = linalg.cholesky(linalg.inv(sw_reg), lower=True)
        return Backend(mean=mu.astype(np.float32), transform=chol.astype(np.float32), kind="wccn")
    k = min(settings.dims, d, n_classes - 1)
    if k < settings.dims:
        logger.warning("LDA reduced to %s dimensions (D=%s, %s classes)", k, d, n_classes)
    evals, evecs = linalg.eigh(sb, sw_reg)  # ascending; evecs^T Sw_reg evecs = I
    order = np.argsort(evals)[::-1][:k]
    evals = np.clip(evals[order], 0.0, None)
    transform = evecs[:, order]
    if settings.weighting == "plda":
        transform = transform * np.sqrt(evals / (1.0 + evals))[None, :]
    logger.info("LDA %s -> %s dims, top ratios %s", d, k, np.round(evals[:5], 3))
    return Backend(
        mean=mu.astype(np.float32),
        transform=transform.astype(np.float32),
        kind=settings.kind,
        eigenvalues=evals.astype(np.float32),
    )


def cross_validated_eer(
    embeddings: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    settings: BackendSettings | None = None,
    folds: int = 5,
    seed: int = 0,
) -> float:
    """EER of pseudo-pairs on held-out infants, the back-end fitted on the other folds.

    The infants are split into ``folds`` groups; for each, the back-end is fitted on the rest and each
    held-out infant's first file is enrolled, its other files are the trials (against every enrolled
    infant). Files of one infant share a recording session, so this is optimistic next to B vs D
    pairs, but it uses the training split only: a selection criterion that leaves dev untouched.
    """
    from cryid.models.evaluation.metrics import eer

    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels)
    babies = np.unique(y)
    folds = max(2, min(folds, len(babies) // 2))
    fold_of = dict(
        zip(np.random.default_rng(seed).permutation(babies), np.arange(len(babies)) % folds, strict=True)
    )
    fold = np.array([fold_of[b] for b in y])
    pos, neg = [], []
    for f in range(folds):
        held = np.where(fold == f)[0]
        z = fit_backend(x[fold != f], y[fold != f], settings).apply(x[held]).astype(np.float64)
        z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
        first: dict[str, int] = {}
        for i, lab in enumerate(y[held]):
            first.setdefault(str(lab), i)
        enrol = np.array(list(first.values()))
        trials = np.array([i for i in range(len(held)) if first[str(y[held][i])] != i])
        if len(trials) == 0:
            continue
        s = z[trials] @ z[enrol].T
        same = y[held][trials][:, None] == y[held][enrol][None, :]
        pos.append(s[same])
        neg.append(s[~same])
    if not pos or not np.concatenate(neg).size:
        raise BackendError("cross-validation needs at least 4 infants, some with two or more files")
    return eer(np.concatenate(pos), np.concatenate(neg))[0]
