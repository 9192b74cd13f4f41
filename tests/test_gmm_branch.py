"""The GMM-supervector branch (`cryid.models.training.gmm_branch`) on generated data with a known answer.

Synthetic "babies" are harmonic cries that differ only in their fundamental frequency (each baby's F0
wanders +-4% around its own value, with jitter, level changes and noise): the branch fitted on some clips
of each must separate new clips of them, and the same fit on permuted labels must be at chance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryid.models.evaluation.metrics import eer
from cryid.models.frontend import Fbank
from cryid.models.training.backend import BackendError
from cryid.models.training.gmm_branch import BRANCH_NAME, GmmBranch, fit_branch, fuse, load_branch

SR = 16000
F0S = (300.0, 360.0, 430.0, 520.0, 620.0, 740.0)


def _cry(f0: float, rng: np.random.Generator, seconds: float = 1.2) -> np.ndarray:
    n = int(seconds * SR)
    f = f0 * (1 + 0.04 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * np.arange(n) / SR + rng.uniform(0, 6)))
    f *= 1 + 0.005 * rng.standard_normal(n).cumsum() / np.sqrt(n)  # slow jitter
    phase = 2 * np.pi * np.cumsum(f) / SR
    wav = sum((0.6 / k) * np.sin(k * phase) for k in range(1, 9) if k * f0 < 7000)
    wav = wav * np.hanning(n) ** 0.3 * 10 ** (rng.uniform(-12, 0) / 20)
    return (wav + 0.003 * rng.standard_normal(n)).astype(np.float32)


def _features(clips: list[np.ndarray]) -> list[np.ndarray]:
    fb = Fbank()
    lm = [fb.log_mel(c) for c in clips]
    mean = np.concatenate(lm).mean(axis=0)
    return [x - mean for x in lm]


@pytest.fixture(scope="module")
def data() -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    clips, labels = [], []
    for b, f0 in enumerate(F0S):
        for _ in range(10):
            clips.append(_cry(f0, rng))
            labels.append(f"b{b}")
    feats = _features(clips)
    y = np.array(labels)
    train = np.array([i % 10 < 6 for i in range(len(y))])
    return (
        [f for f, t in zip(feats, train, strict=True) if t], y[train],
        [f for f, t in zip(feats, train, strict=True) if not t], y[~train],
    )  # fmt: skip


def _eer(branch, feats: list[np.ndarray], y: np.ndarray) -> float:
    e = np.stack([branch.embed(f) for f in feats])
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    s = e @ e.T
    iu = np.triu_indices(len(y), 1)
    same = (y[:, None] == y[None, :])[iu]
    return eer(s[iu][same], s[iu][~same])[0]


def test_babies_that_differ_only_in_f0_are_separated(data) -> None:
    x_tr, y_tr, x_te, y_te = data
    branch = fit_branch(x_tr, y_tr, components=8, dims=5, n_ceps=12)
    assert branch.output_dim == 5 and branch.components == 8
    assert _eer(branch, x_te, y_te) <= 0.05


def test_permuted_labels_give_chance(data) -> None:
    x_tr, y_tr, x_te, y_te = data
    branch = fit_branch(x_tr, np.random.default_rng(1).permutation(y_tr), components=8, dims=5, n_ceps=12)
    assert 0.3 <= _eer(branch, x_te, y_te) <= 0.7


def test_saved_branch_gives_the_same_embeddings_and_bad_files_are_refused(data, tmp_path: Path) -> None:
    x_tr, y_tr, x_te, _ = data
    branch = fit_branch(x_tr, y_tr, components=4, dims=3, n_ceps=8)
    branch.save(tmp_path)
    again = load_branch(tmp_path / BRANCH_NAME)
    np.testing.assert_array_equal(branch.embed(x_te[0]), again.embed(x_te[0]))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(BackendError, match="not a readable GMM branch"):
        load_branch(bad)
    with np.load(tmp_path / BRANCH_NAME) as z:
        arrays = {k: z[k] for k in z.files}
    short = {"lda_mean": arrays["lda_mean"][:, :-1], "lda_transform": arrays["lda_transform"][:, :-1]}
    np.savez(tmp_path / "short.npz", **{**arrays, **short})
    with pytest.raises(BackendError, match="LDA expects"):
        load_branch(tmp_path / "short.npz")


def test_fused_cosine_is_the_mean_of_the_branch_cosines() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 7)), rng.standard_normal((2, 4))
    f = fuse(a, b)
    cos = lambda u, v: float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))  # noqa: E731
    assert np.linalg.norm(f, axis=1) == pytest.approx([1.0, 1.0], abs=1e-6)
    assert float(f[0] @ f[1]) == pytest.approx((cos(a[0], a[1]) + cos(b[0], b[1])) / 2, abs=1e-6)


def test_torch_module_equals_the_numpy_branch(data) -> None:
    torch = pytest.importorskip("torch", reason="the export graph needs the `train` extra")
    from cryid.models.training.gmm_branch import torch_module

    x_tr, y_tr, x_te, _ = data
    branch = fit_branch(x_tr, y_tr, components=8, dims=5, n_ceps=12)
    module = torch_module(branch, 80)
    batch = np.stack([x_te[0], x_te[1]])  # equal lengths, as the daemon batches
    with torch.no_grad():
        got = module(torch.from_numpy(batch)).numpy()
    want = np.stack([branch.embed(x_te[0]), branch.embed(x_te[1])])
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_several_ubms_average_their_cosines_and_survive_save_load_and_torch(data, tmp_path: Path) -> None:
    x_tr, y_tr, x_te, _ = data
    branch = fit_branch(x_tr, y_tr, components=4, dims=3, n_ceps=8, members=3)
    assert (branch.members, branch.output_dim) == (3, 9)
    assert len({float(u.means.sum()) for u in branch.ubms}) == 3  # three different draws, not one copied
    e0, e1 = branch.embed(x_te[0]), branch.embed(x_te[1])
    assert np.linalg.norm(e0) == pytest.approx(1.0, abs=1e-6)
    single = [
        GmmBranch((u,), (lda,), branch.n_ceps, branch.relevance)
        for u, lda in zip(branch.ubms, branch.ldas, strict=True)
    ]
    mean_cos = np.mean([float(b.embed(x_te[0]) @ b.embed(x_te[1])) for b in single])
    assert float(e0 @ e1) == pytest.approx(mean_cos, abs=1e-6)
    branch.save(tmp_path)
    np.testing.assert_array_equal(load_branch(tmp_path).embed(x_te[0]), e0)
    with pytest.raises(BackendError, match="at least one UBM"):
        fit_branch(x_tr, y_tr, components=4, dims=3, n_ceps=8, members=0)


def test_a_one_ubm_file_without_the_members_axis_still_loads(data, tmp_path: Path) -> None:
    x_tr, y_tr, x_te, _ = data
    branch = fit_branch(x_tr, y_tr, components=4, dims=3, n_ceps=8)
    branch.save(tmp_path)
    with np.load(tmp_path / BRANCH_NAME) as z:
        old = {k: (z[k][0] if z[k].ndim > 0 else z[k]) for k in z.files}  # the layout before members
    np.savez(tmp_path / "old.npz", **old)
    np.testing.assert_array_equal(load_branch(tmp_path / "old.npz").embed(x_te[0]), branch.embed(x_te[0]))


def test_torch_module_equals_the_numpy_branch_with_several_ubms(data) -> None:
    torch = pytest.importorskip("torch", reason="the export graph needs the `train` extra")
    from cryid.models.training.gmm_branch import torch_module

    x_tr, y_tr, x_te, _ = data
    branch = fit_branch(x_tr, y_tr, components=8, dims=5, n_ceps=12, members=2)
    with torch.no_grad():
        got = torch_module(branch, 80)(torch.from_numpy(np.stack([x_te[0], x_te[1]]))).numpy()
    want = np.stack([branch.embed(x_te[0]), branch.embed(x_te[1])])
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
