"""A second branch beside the ECAPA statistics: GMM mean supervectors (the i-vector family's first-order
statistics) of cepstra of the log-mel, reduced by their own LDA.

Why: in the model search (`bench/model_search.py`, model card) the LDA of these supervectors fused with
the shipped statistics' LDA was the first variant to beat the LDA of Fbank mean+std by more than the
noise on rooms of 8 (cross-session CV over dev folds), and it lowered the 5-fold train CV EER from 13.1%
to 10.9%. Each recording's frames are scored against a universal background model (UBM: a diagonal
Gaussian mixture of cepstral frames of the training split); the MAP-adapted mean offsets, scaled as the
GMM-SVM supervector ``sqrt(w_c) (m_c - mu_c) / sigma_c``, describe where in the cepstral space this
recording's frames sit, component by component. That is a finer picture of the cry's spectral envelope
and its dynamics than one mean and one standard deviation per band.

Fusion: the exported graph returns ``[a / |a|, b] / sqrt(2)`` (a: the ECAPA statistics after their LDA,
b: the branch's unit-length output, the supervector after its LDA, or with several UBMs each member's
normalised LDA output side by side over sqrt(members)), so the cosine of two embeddings is the mean of the
two branches' cosines, and the daemon scores it as any other embedding.

Everything here is NumPy (fitting and the reference embedding for export parity); `torch_module`
builds the same computation in torch for `cryid model export`, which appends it to the ONNX graph.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryid.models.files import save_npz
from cryid.models.training.backend import Backend, BackendError, BackendSettings, fit_backend

logger = logging.getLogger(__name__)

BRANCH_NAME = "gmm_branch.npz"


def dct_matrix(n_mels: int, n_ceps: int) -> np.ndarray:
    """Orthonormal DCT-II over ``n_mels`` bands, first ``n_ceps`` rows: (n_ceps, n_mels), float32."""
    k = np.arange(n_ceps)[:, None]
    d = np.cos(np.pi * k * (2 * np.arange(n_mels)[None, :] + 1) / (2 * n_mels)) * np.sqrt(2.0 / n_mels)
    d[0] /= np.sqrt(2.0)
    return d.astype(np.float32)


def delta(x: np.ndarray) -> np.ndarray:
    """Central difference over time with edge-reflecting padding (x[t+1] - x[t-1], as the ECAPA's
    first TDNN layer pads)."""
    p = np.concatenate([x[1:2], x, x[-2:-1]]) if len(x) > 1 else np.concatenate([x, x, x])
    return p[2:] - p[:-2]


def cepstra(features: np.ndarray, n_ceps: int) -> np.ndarray:
    """Cepstra of normalised log-mel frames (frames, n_mels): the first ``n_ceps`` DCT coefficients (c0,
    the level, included) and half their central difference: (frames, 2 * n_ceps), float64."""
    c = np.asarray(features, dtype=np.float64) @ dct_matrix(features.shape[1], n_ceps).T.astype(np.float64)
    return np.concatenate([c, 0.5 * delta(c)], axis=1)


@dataclass(frozen=True)
class UBM:
    """A diagonal-covariance Gaussian mixture of cepstral frames (the universal background model)."""

    weights: np.ndarray  # (C,)
    means: np.ndarray  # (C, D)
    variances: np.ndarray  # (C, D)

    def posteriors(self, f: np.ndarray) -> np.ndarray:
        """Responsibilities (frames, C) of every component for every frame."""
        prec = 1.0 / self.variances
        ll = (
            -0.5 * (f**2) @ prec.T
            + f @ (self.means * prec).T
            - 0.5 * np.sum(self.means**2 * prec + np.log(self.variances), axis=1)
            + np.log(self.weights)
        )
        ll -= ll.max(axis=1, keepdims=True)
        g = np.exp(ll)
        return g / g.sum(axis=1, keepdims=True)

    def supervector(self, f: np.ndarray, relevance: float) -> np.ndarray:
        """MAP-adapted mean offsets scaled as the GMM-SVM supervector, then each component's share of
        the frames: (C * D + C,)."""
        g = self.posteriors(f)
        n = g.sum(axis=0)
        off = (g.T @ f - n[:, None] * self.means) / (n + relevance)[:, None]
        sv = np.sqrt(self.weights)[:, None] * off / np.sqrt(self.variances)
        return np.concatenate([sv.ravel(), n / max(len(f), 1)])


def fit_ubm(frames: np.ndarray, components: int, iters: int = 20, seed: int = 0) -> UBM:
    """EM for a diagonal GMM, started from randomly chosen frames; variances floored at 1% of the data's."""
    f = np.asarray(frames, dtype=np.float64)
    if len(f) < components:
        raise BackendError(f"a UBM of {components} components needs at least as many frames, got {len(f)}")
    rng = np.random.default_rng(seed)
    floor = 0.01 * f.var(axis=0)
    ubm = UBM(
        np.full(components, 1.0 / components),
        f[rng.choice(len(f), components, replace=False)],
        np.tile(f.var(axis=0), (components, 1)),
    )
    for _ in range(iters):
        g = ubm.posteriors(f)
        n = g.sum(axis=0) + 1e-10
        means = (g.T @ f) / n[:, None]
        var = np.maximum((g.T @ f**2) / n[:, None] - means**2, floor)
        ubm = UBM(n / n.sum(), means, var)
    return ubm


@dataclass(frozen=True)
class GmmBranch:
    """One or more UBMs, each with its supervectors' LDA: normalised log-mel features -> branch embedding.

    With several UBMs (fitted from different random starts and frame draws), the branch embedding is each
    member's LDA output, length-normalised, side by side and divided by sqrt(members): its cosine is the
    mean of the members' cosines. One UBM's EM lands in a different local optimum with every start, and
    in the model search the room-of-8 top-1 of a single draw moved by 8 points between draws; averaging
    members reduces that luck (4 members: 3.3 points between two fits; model card, round 3)."""

    ubms: tuple[UBM, ...]
    ldas: tuple[Backend, ...]
    n_ceps: int
    relevance: float

    @property
    def components(self) -> int:
        return int(self.ubms[0].weights.shape[0])

    @property
    def members(self) -> int:
        return len(self.ubms)

    @property
    def output_dim(self) -> int:
        return sum(lda.output_dim for lda in self.ldas)

    def embed(self, features: np.ndarray) -> np.ndarray:
        """The branch embedding (unit length) of one clip's features."""
        c = cepstra(features, self.n_ceps)
        outs = [
            lda.apply(u.supervector(c, self.relevance)).astype(np.float64)
            for u, lda in zip(self.ubms, self.ldas, strict=True)
        ]
        outs = [o / max(float(np.linalg.norm(o)), 1e-12) for o in outs]
        return (np.concatenate(outs) / np.sqrt(len(outs))).astype(np.float32)

    def save(self, path: Path) -> Path:
        """``gmm_branch.npz``: every array with a leading axis over the members."""
        path = Path(path)
        if path.is_dir():
            path = path / BRANCH_NAME
        stack = lambda arrays, dtype: np.stack([np.asarray(a, dtype=dtype) for a in arrays])  # noqa: E731
        return save_npz(
            path,
            {
                "ubm_weights": stack([u.weights for u in self.ubms], np.float64),
                "ubm_means": stack([u.means for u in self.ubms], np.float64),
                "ubm_variances": stack([u.variances for u in self.ubms], np.float64),
                "lda_mean": stack([lda.mean for lda in self.ldas], np.float32),
                "lda_transform": stack([lda.transform for lda in self.ldas], np.float32),
                "n_ceps": np.array(self.n_ceps),
                "relevance": np.array(self.relevance),
            },
        )


def load_branch(path: Path) -> GmmBranch:
    """Read ``gmm_branch.npz`` (or the one inside a directory); ``BackendError`` names what is wrong. A file
    of one UBM without the members axis (written before members existed) reads as one member."""
    path = Path(path)
    if path.is_dir():
        path = path / BRANCH_NAME
    try:
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        if a["ubm_weights"].ndim == 1:
            a = {k: v[None] if k not in ("n_ceps", "relevance") else v for k, v in a.items()}
        k = len(a["ubm_weights"])
        ubms = tuple(UBM(a["ubm_weights"][i], a["ubm_means"][i], a["ubm_variances"][i]) for i in range(k))
        ldas = tuple(
            Backend(mean=a["lda_mean"][i], transform=a["lda_transform"][i], kind="lda") for i in range(k)
        )
        branch = GmmBranch(ubms, ldas, int(a["n_ceps"]), float(a["relevance"]))
        c, d = a["ubm_means"].shape[1:]
    except (OSError, KeyError, ValueError, IndexError) as exc:
        raise BackendError(f"{path}: not a readable GMM branch ({type(exc).__name__}: {exc})") from exc
    if (
        a["ubm_weights"].shape != (k, c)
        or a["ubm_variances"].shape != (k, c, d)
        or d != 2 * branch.n_ceps
        or len(a["lda_mean"]) != k
        or len(a["lda_transform"]) != k
    ):
        raise BackendError(
            f"{path}: UBM shapes disagree (weights {a['ubm_weights'].shape}, means {a['ubm_means'].shape}, "
            f"{len(a['lda_transform'])} LDAs)"
        )
    if any(lda.input_dim != c * d + c for lda in ldas):
        raise BackendError(
            f"{path}: LDA expects {ldas[0].input_dim}-d supervectors, the UBM gives {c * d + c}"
        )
    if (
        not all(np.isfinite(v).all() for v in a.values() if v.dtype.kind == "f")
        or (a["ubm_variances"] <= 0).any()
    ):
        raise BackendError(f"{path}: GMM branch holds NaN, infinite or non-positive variance values")
    return branch


def fit_branch(
    features: Sequence[np.ndarray],
    labels: Sequence[str] | np.ndarray,
    components: int = 64,
    dims: int = 80,
    n_ceps: int = 20,
    relevance: float = 16.0,
    frames_per_clip: int = 100,
    seed: int = 0,
    members: int = 1,
) -> GmmBranch:
    """For each of ``members`` UBMs (seeds ``seed``, ``seed + 1``, ...): fit it on up to
    ``frames_per_clip`` random frames of every clip, then the LDA of the clips' supervectors (each label
    a class)."""
    if len(features) != len(labels):
        raise BackendError(f"{len(features)} clips but {len(labels)} labels")
    if members < 1:
        raise BackendError(f"a GMM branch needs at least one UBM, got {members}")
    ceps = [cepstra(f, n_ceps) for f in features]
    ubms, ldas = [], []
    for k in range(members):
        rng = np.random.default_rng(seed + k)
        sample = np.concatenate(
            [c[rng.choice(len(c), min(frames_per_clip, len(c)), replace=False)] for c in ceps]
        )
        ubm = fit_ubm(sample, components, seed=seed + k)
        sv = np.stack([ubm.supervector(c, relevance) for c in ceps])
        ubms.append(ubm)
        ldas.append(fit_backend(sv, np.asarray(labels), BackendSettings(kind="lda", dims=dims)))
        logger.info("GMM branch UBM %d/%d: %d x %d on %d frames, LDA %d -> %d", k + 1, members, components,
                    2 * n_ceps, len(sample), sv.shape[1], ldas[-1].output_dim)  # fmt: skip
    return GmmBranch(tuple(ubms), tuple(ldas), n_ceps, relevance)


def fuse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[a / |a|, b / |b|] / sqrt(2)`` row-wise: the cosine of two fused embeddings is the mean of the
    two branches' cosines."""
    a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (np.concatenate([a, b], axis=1) / np.sqrt(2.0)).astype(np.float32)


def torch_module(branch: GmmBranch, n_mels: int) -> Any:
    """The branch as a torch module: features (B, T, n_mels) -> (B, dims), for ONNX export. Every clip of
    a batch is unpadded (the daemon batches clips of one length), so the frame count is T for all."""
    import torch

    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731

    class Member(torch.nn.Module):
        """One UBM and its LDA: cepstral frames (B, T, D) -> unit-length LDA output (B, dims)."""

        def __init__(self, ubm: UBM, lda: Backend) -> None:
            super().__init__()
            prec = 1.0 / ubm.variances
            self.relevance = float(branch.relevance)
            self.register_buffer("neg_half_prec", f32(-0.5 * prec.T))  # (D, C)
            self.register_buffer("mean_prec", f32((ubm.means * prec).T))  # (D, C)
            self.register_buffer(
                "const",
                f32(-0.5 * np.sum(ubm.means**2 * prec + np.log(ubm.variances), axis=1) + np.log(ubm.weights)),
            )
            self.register_buffer("means", f32(ubm.means))  # (C, D)
            self.register_buffer(
                "scale", f32(np.sqrt(ubm.weights)[:, None] / np.sqrt(ubm.variances))
            )  # (C, D)
            self.register_buffer("lda_mean", f32(lda.mean))
            self.register_buffer("lda_transform", f32(lda.transform))

        def forward(self, f: torch.Tensor) -> torch.Tensor:
            ll = torch.matmul(f * f, self.neg_half_prec) + torch.matmul(f, self.mean_prec) + self.const
            g = torch.softmax(ll, dim=2)  # (B, T, C)
            n = g.sum(dim=1)  # (B, C)
            first = torch.matmul(g.transpose(1, 2), f) - n.unsqueeze(2) * self.means  # (B, C, D)
            sv = first / (n + self.relevance).unsqueeze(2) * self.scale
            frames = torch.ones_like(f[:, :, 0]).sum(dim=1, keepdim=True)  # (B, 1)
            sv = torch.cat([sv.flatten(1), n / frames], dim=1)
            out = torch.matmul(sv - self.lda_mean, self.lda_transform)
            return out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)

    class Branch(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("dct", f32(dct_matrix(n_mels, branch.n_ceps).T))  # (n_mels, n_ceps)
            self.members = torch.nn.ModuleList(
                Member(u, lda) for u, lda in zip(branch.ubms, branch.ldas, strict=True)
            )
            self.norm = float(np.sqrt(branch.members))

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            c = torch.matmul(features, self.dct)  # (B, T, n_ceps)
            p = torch.cat([c[:, 1:2], c, c[:, -2:-1]], dim=1)
            f = torch.cat([c, 0.5 * (p[:, 2:] - p[:, :-2])], dim=2)  # (B, T, D)
            return torch.cat([m(f) for m in self.members], dim=1) / self.norm

    return Branch().eval()
