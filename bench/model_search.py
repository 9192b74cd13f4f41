"""Honest model search (issue 11): statistic sets x back-ends, selected by cross-session cross-validation.

    nice -n 10 python bench/model_search.py --data ../shared/data/donateacry-cc --cache runs/search

Stage 1 (cached in --cache/stats.npz, about 3 min): every train and dev recording through the daemon's
NumPy front end (`cryid.models.frontend`), statistic sets of `bench/search_parts.feature_sets`, two
channel-augmented copies of every train recording (40 simulated channels shared among infants), the
dev baby-periods (CryCeleb concatenation) clean and through one simulated ward channel, and the
shipped ONNX model's embeddings of the same.

Stage 2 (each variant = statistic set + back-end + back-end data + scoring):
- train_cv: 5-fold CV over train infants (pseudo pairs within one session: optimistic),
- dev-CV: dev's 30 infants in 3 folds of 10, repeated with --repeats seeds; the back-end is fitted on
  train (+ augmented copies) (+ the dev files of the other 20 infants, both sessions, when the data
  includes `dev`), and the held-out 10 infants are scored B vs D across sessions: EER, channel-matched
  EER, the same through the ward channel, top-1 among the fold's 10, and top-1 in --rooms seeded rooms
  of 8 drawn inside held-out folds. 95% CIs by bootstrap over infants; `d_cm` and `d_room8` are the
  paired bootstrap differences to the reference (LDA 20 of Fbank mean+std) with their CIs.
- one look at dev: the usual 30 x 30 protocol, only for back-ends fitted without dev.
Nothing here writes into the repository.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cryid.models.training.backend import BackendSettings, fit_backend
from cryid.models.training.gmm_branch import cepstra, fit_ubm
from search_parts import (
    COMPONENTS,
    N_CEPS,
    RELEVANCE,
    StatContext,
    apply_channel,
    dev_periods,
    feature_sets,
    load_wavs,
    random_channel,
    ward_channel,
)
from train_experiments import read_rows

logger = logging.getLogger("model_search")
N_AUG, N_CHANNELS, REF, SHIPPED = 2, 40, "fbank_ms lda20 train cos", "shipped_onnx - - cos"


def build_stats(data: Path, cache: Path, ubm: dict | None = None) -> dict[str, np.ndarray]:
    path = cache / "stats.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    from cryid.models.embedder import Embedder
    from cryid.models.frontend import Fbank

    repo = Path(__file__).resolve().parent.parent
    emb = Embedder(repo / "models" / "default")
    gmean = np.asarray(emb.manifest.frontend.global_mean, dtype=np.float32)
    fb = Fbank()
    rows = read_rows(data)
    wavs = load_wavs(data, rows)
    train = [r for r in rows if r["split"] == "train"]
    dev = [r for r in rows if r["split"] == "dev"]
    periods = dev_periods(rows)
    chans = [random_channel(s) for s in range(N_CHANNELS)]
    ward = ward_channel(7)
    ctx = stat_context(fb, gmean, [wavs[r["file_id"]] for r in train], **(ubm or {}))
    rng = np.random.default_rng(1)
    out: dict[str, list[np.ndarray]] = {}
    onnx: dict[str, list[np.ndarray]] = {"train": [], "period": [], "ward": []}
    t0 = time.time()

    def add(unit: str, wav: np.ndarray) -> None:
        for name, v in feature_sets(fb.log_mel(wav), gmean, wav, ctx).items():
            out.setdefault(f"{unit}/{name}", []).append(v.astype(np.float32))
        if unit in onnx:
            onnx[unit].append(emb.embed(wav))

    for i, r in enumerate(train):
        add("train", wavs[r["file_id"]])
        for k, c in enumerate(rng.choice(N_CHANNELS, N_AUG, replace=False)):
            add("aug", apply_channel(wavs[r["file_id"]], chans[c], noise_seed=10 * i + k))
        if i % 100 == 0:
            logger.info("train %d/%d (%.0f s)", i, len(train), time.time() - t0)
    for r in dev:
        add("devfile", wavs[r["file_id"]])
    for j, v in enumerate(periods.values()):
        wav = np.concatenate([wavs[r["file_id"]] for r in v])
        add("period", wav)
        add("ward", apply_channel(wav, ward, noise_seed=99_000 + j))
    res = {k: np.stack(v) for k, v in out.items()}
    res.update({f"{u}/shipped_onnx": np.stack(v) for u, v in onnx.items()})
    res["train_y"] = np.array([r["baby_id"] for r in train])
    res["aug_y"] = np.repeat(res["train_y"], N_AUG)
    res["devfile_y"] = np.array([r["baby_id"] for r in dev])
    res["period_key"] = np.array([f"{b}|{p}|{v[0]['codec']}" for (b, p), v in periods.items()])
    np.savez(path, **res)
    logger.info("stats cached in %s (%.0f s)", path, time.time() - t0)
    return res


def build_ensemble(data: Path, cache: Path, k: int, frames: int = 100) -> dict[str, np.ndarray]:
    """``gmm_ens{k}``: the supervectors of k UBMs (seeds 0..k-1, each drawn and started as `stat_context`
    draws seed s: seed 0 is the `gmm_sv` UBM) side by side, for train, dev files, dev periods and the ward
    channel (no augmented copies). A UBM's EM starts from random frames, and one UBM's room-of-8 top-1 moved
    by 8 points between draws (model card, round 2): averaging the cosines of several is the usual cure."""
    path = cache / f"gmm_ens{k}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return {x: z[x] for x in z.files}
    from cryid.models.embedder import Embedder
    from cryid.models.frontend import Fbank

    repo = Path(__file__).resolve().parent.parent
    gmean = np.asarray(Embedder(repo / "models" / "default").manifest.frontend.global_mean, dtype=np.float32)
    fb = Fbank()
    rows = read_rows(data)
    wavs = load_wavs(data, rows)
    ward = ward_channel(7)
    ceps: dict[str, list[np.ndarray]] = {
        "train": [wavs[r["file_id"]] for r in rows if r["split"] == "train"],
        "devfile": [wavs[r["file_id"]] for r in rows if r["split"] == "dev"],
    }
    periods = [np.concatenate([wavs[r["file_id"]] for r in v]) for v in dev_periods(rows).values()]
    ceps["period"] = periods
    ceps["ward"] = [apply_channel(w, ward, noise_seed=99_000 + j) for j, w in enumerate(periods)]
    t0 = time.time()
    ceps = {u: [cepstra(fb.log_mel(w) - gmean, N_CEPS) for w in ws] for u, ws in ceps.items()}
    ubms = []
    for seed in range(k):
        rng = np.random.default_rng(seed)
        sample = [
            c[rng.choice(len(c), min(frames, len(c)), replace=False)] if frames else c for c in ceps["train"]
        ]
        ubms.append(fit_ubm(np.concatenate(sample), COMPONENTS, seed=seed))
        logger.info("UBM %d/%d (%.0f s)", seed + 1, k, time.time() - t0)
    res = {
        f"{u}/gmm_ens{k}": np.stack(
            [np.concatenate([m.supervector(c, RELEVANCE) for m in ubms]).astype(np.float32) for c in cs]
        )
        for u, cs in ceps.items()
    }
    np.savez(path, **res)
    logger.info("%d UBMs' supervectors cached in %s (%.0f s)", k, path, time.time() - t0)
    return res


def build_candidate(data: Path, cache: Path, model: Path) -> dict[str, np.ndarray]:
    """``candidate_onnx``: an exported model's own embeddings (the artifact the daemon would load, as
    `shipped_onnx` is the shipped one's) of the train files, the dev baby-periods and the ward channel."""
    from cryid.models.embedder import Embedder

    emb = Embedder(model)
    path = cache / f"candidate_{emb.sha256[:12]}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return {x: z[x] for x in z.files}
    rows = read_rows(data)
    wavs = load_wavs(data, rows)
    periods = [np.concatenate([wavs[r["file_id"]] for r in v]) for v in dev_periods(rows).values()]
    ward = ward_channel(7)
    t0 = time.time()
    res = {
        "train/candidate_onnx": np.stack(
            [emb.embed(wavs[r["file_id"]]) for r in rows if r["split"] == "train"]
        ),
        "period/candidate_onnx": np.stack([emb.embed(w) for w in periods]),
        "ward/candidate_onnx": np.stack(
            [emb.embed(apply_channel(w, ward, noise_seed=99_000 + j)) for j, w in enumerate(periods)]
        ),
    }
    np.savez(path, **res)
    logger.info("candidate %s (%s) embedded in %.0f s", model, emb.sha256[:12], time.time() - t0)
    return res


def stat_context(
    fb: object,
    gmean: np.ndarray,
    train_wavs: list[np.ndarray],
    ubm_from: Path | None = None,
    ubm_seed: int = 0,
    ubm_frames: int = 100,
) -> StatContext:
    """The 150-mel front end and per-band means, and the UBM (64 components, 100 frames of every training
    recording, or the UBM of a `cryid model train --gmm-components` run's gmm_branch.npz), all from the
    training split."""
    from cryid.models.frontend import Fbank
    from cryid.models.training.gmm_branch import load_branch

    t0 = time.time()
    fb150 = Fbank(n_mels=150)
    lm150 = [fb150.log_mel(w) for w in train_wavs]
    gmean150 = np.concatenate(lm150).mean(axis=0).astype(np.float32)
    rng = np.random.default_rng(ubm_seed)
    frames = []
    for w in train_wavs:
        c = cepstra(fb.log_mel(w) - gmean, N_CEPS)
        frames.append(c[rng.choice(len(c), min(ubm_frames, len(c)), replace=False)] if ubm_frames else c)
    if ubm_from:
        ubm = load_branch(ubm_from).ubms[0]
    else:
        ubm = fit_ubm(np.concatenate(frames), COMPONENTS, seed=ubm_seed)
    logger.info("150-mel means and UBM on %d frames (%.0f s)", sum(map(len, frames)), time.time() - t0)
    return StatContext(gmean=gmean, fb150=fb150, gmean150=gmean150, ubm=ubm)


@dataclass(frozen=True)
class Variant:
    feats: str
    backend: str  # "-" none, "ldaN", "ldaN_pw" (PLDA-weighted LDA), "wccn"
    data: str  # train, train+aug, train+dev, train+dev+aug
    score: str  # cos, asnorm, plda

    @property
    def name(self) -> str:
        return f"{self.feats} {self.backend} {self.data} {self.score}"


def _lnorm(z: np.ndarray) -> np.ndarray:
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


class Scorer:
    """A fitted back-end + scoring rule: ``scores(enrol, test)`` on raw statistics."""

    def __init__(
        self, v: Variant, x: np.ndarray, y: np.ndarray, cohort: np.ndarray, parts: list[int] | None = None
    ) -> None:
        if v.backend.startswith("fuse"):  # one LDA per statistic set; equal-weight sum of their cosines
            # A part "DxK" (an ensemble, e.g. gmm_ens4 = 4 UBMs' supervectors side by side) is K equal
            # column blocks with one LDA D each, whose cosines are averaged inside the part.
            cuts = np.cumsum([0, *(parts or [])])
            spans = []
            for a, b, spec in zip(cuts[:-1], cuts[1:], v.backend[4:].split(","), strict=True):
                d, _, k = spec.partition("x")
                sub = np.linspace(a, b, int(k or 1) + 1).astype(int)
                bes = [
                    (fit_backend(x[:, s:e], y, BackendSettings(kind="lda", dims=int(d))), s, e)
                    for s, e in itertools.pairwise(sub)
                ]
                spans.append(bes)

            def part(z: np.ndarray, bes: list) -> np.ndarray:
                u = [_lnorm(be.apply(z[:, s:e]).astype(np.float64)) for be, s, e in bes]
                return np.concatenate(u, axis=1) / np.sqrt(len(u))

            self.f = lambda z: np.concatenate([part(z, bes) for bes in spans], axis=1)
        elif v.backend == "-":
            self.f = lambda a: np.asarray(a, dtype=np.float64)
        else:
            kind = "wccn" if v.backend == "wccn" else "lda"
            dims = int(v.backend[3:].split("_")[0]) if kind == "lda" else 20
            w = "plda" if v.backend.endswith("_pw") else "none"
            be = fit_backend(x, y, BackendSettings(kind=kind, dims=dims, weighting=w))
            self.f = lambda a: be.apply(a).astype(np.float64)
        self.score = v.score
        if v.score == "asnorm":
            self.cohort = _lnorm(self.f(cohort))
        if v.score == "plda":
            z = _lnorm(self.f(x))
            from scipy import linalg

            from cryid.models.training.backend import _scatter

            mu, sw, sb = _scatter(z, y)
            lam, vec = linalg.eigh(sb, sw + 1e-6 * np.eye(len(sw)))
            self.mu, self.vec, self.lam = mu, vec, np.clip(lam, 1e-6, None)

    def scores(self, enrol: np.ndarray, test: np.ndarray) -> np.ndarray:
        e, t = _lnorm(self.f(enrol)), _lnorm(self.f(test))
        if self.score == "plda":  # two-covariance PLDA log-likelihood ratio (within = I, between = lam)
            u, v, b = (e - self.mu) @ self.vec, (t - self.mu) @ self.vec, self.lam
            tt, det = b + 1.0, (b + 1.0) ** 2 - b**2
            quad = (tt / det - 1.0 / tt)[None, None, :] * (u[:, None, :] ** 2 + v[None, :, :] ** 2)
            cross = (-2.0 * b / det)[None, None, :] * u[:, None, :] * v[None, :, :]
            return -0.5 * (quad + cross).sum(-1) - 0.5 * np.sum(np.log(det) - 2 * np.log(tt))
        s = e @ t.T
        if self.score == "asnorm":
            k = min(100, len(self.cohort))
            ce = np.sort(e @ self.cohort.T, axis=1)[:, -k:]
            ct = np.sort(t @ self.cohort.T, axis=1)[:, -k:]
            zs_e = (s - ce.mean(1)[:, None]) / ce.std(1)[:, None]
            s = 0.5 * (zs_e + (s - ct.mean(1)[None, :]) / ct.std(1)[None, :])
        return s


def part_dims(v: Variant, st: dict[str, np.ndarray]) -> list[int] | None:
    """Column counts of the statistic sets that a fused variant (``a&b``) concatenates."""
    names = v.feats.split("&")
    return [st[f"train/{n}"].shape[1] for n in names] if v.backend.startswith("fuse") else None


def add_fused(st: dict[str, np.ndarray], feats: str) -> None:
    """Concatenate the statistic sets of ``a&b`` for every unit (train, aug, devfile, period, ward)."""
    names = feats.split("&")
    for unit in ("train", "aug", "devfile", "period", "ward"):
        if all(f"{unit}/{n}" in st for n in names):
            st[f"{unit}/{feats}"] = np.concatenate([st[f"{unit}/{n}"] for n in names], axis=1)


def weighted_eer(s: np.ndarray, same: np.ndarray, w: np.ndarray) -> float:
    """EER with a weight per trial (1 for the plain EER; bootstrap counts for the CI)."""
    if not (w[same] > 0).any() or not (w[~same] > 0).any():
        return float("nan")
    o = np.argsort(s, kind="stable")
    s, same, w = s[o], same[o], w[o]
    frr = np.concatenate([[0.0], np.cumsum(w * same)]) / np.sum(w * same)  # targets below threshold
    far = 1.0 - np.concatenate([[0.0], np.cumsum(w * ~same)]) / np.sum(w * ~same)
    i = int(np.argmin(np.abs(far - frr)))
    return float((far[i] + frr[i]) / 2)


def train_cv(v: Variant, st: dict[str, np.ndarray]) -> float:
    x, y = st[f"train/{v.feats}"], st["train_y"]
    babies = np.unique(y)
    fold_of = dict(zip(np.random.default_rng(0).permutation(babies), np.arange(len(babies)) % 5, strict=True))
    fold, afold = np.array([fold_of[b] for b in y]), np.array([fold_of[b] for b in st["aug_y"]])
    s_all, same_all = [], []
    for f in range(5):
        xs, ys = [x[fold != f]], [y[fold != f]]
        if "aug" in v.data:
            xs.append(st[f"aug/{v.feats}"][afold != f])
            ys.append(st["aug_y"][afold != f])
        if "dev" in v.data:
            xs.append(st[f"devfile/{v.feats}"])
            ys.append(st["devfile_y"])
        sc = (
            Scorer(v, np.concatenate(xs), np.concatenate(ys), x[fold != f], part_dims(v, st))
            if v.backend != "-"
            else None
        )
        held = np.where(fold == f)[0]
        first: dict[str, int] = {}
        for i in held:
            first.setdefault(str(y[i]), int(i))
        enr = np.array(list(first.values()))
        tst = np.array([i for i in held if first[str(y[i])] != i])
        sc = sc or Scorer(v, x, y, x)
        s_all.append(sc.scores(x[enr], x[tst]).T.ravel())
        same_all.append((y[tst][:, None] == y[enr][None, :]).ravel())
    s, same = np.concatenate(s_all), np.concatenate(same_all)
    return weighted_eer(s, same, np.ones(len(s)))


def dev_cv(v: Variant, st: dict[str, np.ndarray], repeats: int, rooms: int) -> dict[str, np.ndarray]:
    """Cross-session trial lists over held-out dev folds: (b_idx, d_idx, score, same, cm, ward_score),
    and per-infant room-of-8 / fold top-1 hit counts."""
    keys = [k.split("|") for k in st["period_key"]]
    babies = sorted({k[0] for k in keys})
    bi = {b: i for i, b in enumerate(babies)}
    b_rows = np.array([next(j for j, k in enumerate(keys) if k[0] == b and k[1] == "B") for b in babies])
    d_rows = np.array([next(j for j, k in enumerate(keys) if k[0] == b and k[1] == "D") for b in babies])
    codec = np.array([k[2] for k in keys])
    x_tr, y_tr = st[f"train/{v.feats}"], st["train_y"]
    per, ward = st[f"period/{v.feats}"], st[f"ward/{v.feats}"]
    trials, hits8, app8, hit10 = [], np.zeros(30), np.zeros(30), np.zeros(30)
    fold_room8: list[float] = []
    cache: dict[tuple[str, ...], Scorer] = {}
    rng_room = np.random.default_rng(123)
    per_fold_rooms = max(1, rooms // (3 * repeats))
    for r in range(repeats):
        perm = np.random.default_rng(1000 + r).permutation(30)
        for f in range(3):
            held = np.sort(perm[10 * f : 10 * f + 10])
            fit_babies = tuple(babies[i] for i in perm if i not in held) if "dev" in v.data else ()
            if fit_babies not in cache:
                xs, ys = [x_tr], [y_tr]
                if "aug" in v.data:
                    xs.append(st[f"aug/{v.feats}"])
                    ys.append(st["aug_y"])
                if fit_babies:
                    m = np.isin(st["devfile_y"], fit_babies)
                    xs.append(st[f"devfile/{v.feats}"][m])
                    ys.append(st["devfile_y"][m])
                cache[fit_babies] = Scorer(v, np.concatenate(xs), np.concatenate(ys), x_tr, part_dims(v, st))
            sc = cache[fit_babies]
            s = sc.scores(per[b_rows[held]], per[d_rows[held]])  # (B of held, D of held)
            sw = sc.scores(ward[b_rows[held]], ward[d_rows[held]])
            for a in range(10):
                for c in range(10):
                    cm = codec[b_rows[held[a]]] == codec[d_rows[held[c]]]
                    trials.append((held[a], held[c], s[a, c], a == c, cm, sw[a, c], 3 * r + f))
            hit10[held] += np.argmax(s, axis=0) == np.arange(10)
            fold_hits = 0
            for _ in range(per_fold_rooms):
                room = np.sort(rng_room.choice(10, 8, replace=False))
                ok = np.argmax(s[np.ix_(room, room)], axis=0) == np.arange(8)
                hits8[held[room]] += ok
                app8[held[room]] += 1
                fold_hits += int(ok.sum())
            fold_room8.append(fold_hits / (8 * per_fold_rooms))
    t = np.array(trials, dtype=float)
    del bi
    return {"trials": t, "hits8": hits8, "app8": app8, "hit10": hit10 / repeats, "fold_room8": fold_room8}


def fold_figures(res: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per held-out fold (3 x repeats): channel-matched EER and room-of-8 top-1 (the same rooms for every
    variant: the room draws are seeded), for the "consistently over the CV folds" half of the ship rule."""
    t = res["trials"]
    cm = []
    for k in range(len(res["fold_room8"])):
        m = (t[:, 6] == k) & (t[:, 4] > 0)
        cm.append(weighted_eer(t[m, 2], t[m, 3] > 0, np.ones(int(m.sum()))))
    return np.array(cm), np.array(res["fold_room8"])


def one_look(v: Variant, st: dict[str, np.ndarray]) -> dict[str, float]:
    """The usual dev protocol (30 x 30), for back-ends fitted without dev."""
    keys = [k.split("|") for k in st["period_key"]]
    babies = sorted({k[0] for k in keys})
    b = [next(j for j, k in enumerate(keys) if k[0] == x and k[1] == "B") for x in babies]
    d = [next(j for j, k in enumerate(keys) if k[0] == x and k[1] == "D") for x in babies]
    xs, ys = [st[f"train/{v.feats}"]], [st["train_y"]]
    if "aug" in v.data:
        xs.append(st[f"aug/{v.feats}"])
        ys.append(st["aug_y"])
    sc = Scorer(v, np.concatenate(xs), np.concatenate(ys), st[f"train/{v.feats}"], part_dims(v, st))
    per = st[f"period/{v.feats}"]
    s = sc.scores(per[b], per[d])
    same = np.eye(30, dtype=bool)
    codec = np.array([k[2] for k in keys])
    cm = codec[b][:, None] == codec[d][None, :]
    w = np.ones(s.size)
    return {
        "eer": weighted_eer(s.ravel(), same.ravel(), w),
        "eer_cm": weighted_eer(s[cm], same[cm], np.ones(int(cm.sum()))),
        "top1": float(np.mean(np.argmax(s, axis=0) == np.arange(30))),
    }


def summarise(res: dict[str, np.ndarray], boots: np.ndarray) -> dict[str, np.ndarray]:
    """Point value (row 0) and bootstrap values (rows 1..) of each dev-CV figure."""
    t = res["trials"]
    b_i, d_i, s, sw = t[:, 0].astype(int), t[:, 1].astype(int), t[:, 2], t[:, 5]
    same, cm = t[:, 3] > 0, t[:, 4] > 0
    out: dict[str, list[float]] = {k: [] for k in ("eer", "eer_cm", "eer_ward", "top1_10", "room8")}
    for w in np.vstack([np.ones(30), boots]):
        wt = w[b_i] * w[d_i]
        out["eer"].append(weighted_eer(s, same, wt))
        out["eer_cm"].append(weighted_eer(s[cm], same[cm], wt[cm]))
        out["eer_ward"].append(weighted_eer(sw, same, wt))
        out["top1_10"].append(float(np.sum(w * res["hit10"]) / np.sum(w)))
        out["room8"].append(float(np.sum(w * res["hits8"]) / max(np.sum(w * res["app8"]), 1e-9)))
    return {k: np.array(v) for k, v in out.items()}


def variants() -> list[Variant]:
    """The grid. Statistic sets that lost on every measure with train-only back-ends (loud frames only,
    the channel-invariant set) are not refitted with dev data."""
    vs = [Variant("fbank_ms", "lda20", "train", "cos"), Variant("shipped_onnx", "-", "-", "cos")]
    vs.append(Variant("shipped_onnx", "-", "-", "asnorm"))
    every = (
        ("fbank_ms_loud", 40),
        ("shipped_stats_loud", 80),
        ("chan_invariant", 80),
        ("shipped_loud+inv", 80),
    )
    kept = (("fbank_ms", 20), ("fbank_ms", 40), ("shipped_stats", 80), ("shipped+loud_ms", 80))
    for data in ("train", "train+aug", "train+dev", "train+dev+aug"):
        for feats, dims in kept + (every if "dev" not in data else ()):
            v = Variant(feats, f"lda{dims}", data, "cos")
            if v not in vs:
                vs.append(v)
    vs += [Variant("shipped_stats", f"lda{d}", "train", "cos") for d in (40, 160)]
    for feats, dims in (("fbank_ms", 40), ("shipped_stats", 80)):
        for data in ("train", "train+dev"):
            vs += [
                Variant(feats, f"lda{dims}_pw", data, "cos"),
                Variant(feats, f"lda{dims}", data, "asnorm"),
                Variant(feats, f"lda{dims}", data, "plda"),
            ]
    # Second round (stop 22): the i-vector family's GMM supervectors, the leaderboard winner's wider
    # Fbank (150 mels) and score fusion of the shipped statistics with the reference.
    for feats, dims in (("gmm_sv", 80), ("gmm_sv", 160), ("fbank150_ms", 20), ("fbank150_ms", 40)):
        vs += [Variant(feats, f"lda{dims}", d, "cos") for d in ("train", "train+aug")]
    vs += [Variant("shipped_stats150", f"lda{d}", "train", "cos") for d in (80, 160)]
    vs += [
        Variant("shipped_stats&fbank_ms", "fuse80,20", "train", "cos"),
        Variant("shipped_stats&gmm_sv", "fuse80,80", "train", "cos"),
        Variant("shipped_stats&gmm_sv", "fuse80,80", "train", "asnorm"),
        Variant("shipped_stats150&gmm_sv", "fuse80,80", "train", "cos"),
    ]
    return vs


def _ci(a: np.ndarray) -> str:
    lo, hi = np.nanpercentile(a[1:], [2.5, 97.5])
    return f"{100 * a[0]:4.1f} [{100 * lo:4.1f},{100 * hi:4.1f}]"


def _folds(r: dict) -> str:
    """ "a/n (b worse) / c/n (d worse)": held-out folds where the variant beats the reference."""
    f = r.get("folds_vs_ref")
    if not f:
        return "-"
    return (
        f"{f['cm_lower']}/{f['folds']} ({f['cm_higher']} worse) / "
        f"{f['room8_higher']}/{f['folds']} ({f['room8_lower']} worse)"
    )


def markdown(rows: list[dict]) -> str:
    """The results as the model card's table (figures in %, 95% CIs in brackets)."""

    def ci(v: list[float]) -> str:
        return f"{100 * v[0]:.1f} [{100 * v[1]:.1f}, {100 * v[2]:.1f}]"

    out = [
        "| statistics, back-end, fit data, scoring | train CV EER | dev-CV EER | dev-CV channel-matched EER "
        "| ward-channel EER | room-of-8 top-1 | channel-matched vs reference | room-of-8 vs reference "
        "| folds better than the reference: ch.-matched / room-of-8 "
        "| dev one look: EER / ch.-matched / top-1 of 30 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lk = r["one_look"]
        look = f"{100 * lk['eer']:.1f} / {100 * lk['eer_cm']:.1f} / {100 * lk['top1']:.1f}" if lk else "-"
        tcv = "-" if r["train_cv_eer"] != r["train_cv_eer"] else f"{100 * r['train_cv_eer']:.1f}"
        out.append(
            f"| {r['variant']} | {tcv} | {ci(r['eer'])} | {ci(r['eer_cm'])} | {ci(r['eer_ward'])} "
            f"| {ci(r['room8'])} | {ci(r['d_cm_vs_ref'])} | {ci(r['d_room8_vs_ref'])} "
            f"| {_folds(r)} | {look} |"
        )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3, help="dev-CV repetitions (3 folds each)")
    ap.add_argument("--rooms", type=int, default=270, help="rooms of 8 in all")
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--only", nargs="*", default=None, help="substrings of variant names to run")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--ubm-from", type=Path, default=None,
        help="gmm_branch.npz (or its run folder) whose UBM the gmm_sv statistics use (with a fresh --cache)",
    )  # fmt: skip
    ap.add_argument("--ubm-seed", type=int, default=0, help="UBM frames and start seed (fresh --cache)")
    ap.add_argument(
        "--ubm-frames", type=int, default=100, help="frames per training recording for the UBM; 0: all"
    )
    ap.add_argument(
        "--ubm-ensemble", type=int, nargs="*", default=[],
        help="K...: add gmm_ensK (K UBMs' supervectors, seeds 0..K-1) and its variants",
    )  # fmt: skip
    ap.add_argument(
        "--candidate", type=Path, default=None,
        help="an exported model folder: its ONNX embeddings as the variant candidate_onnx",
    )  # fmt: skip
    ap.add_argument("--table-from", type=Path, default=None, help="print a --json result as markdown; no run")
    args = ap.parse_args()
    if args.table_from:
        print(markdown(json.loads(args.table_from.read_text())))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("cryid.models.training.backend").setLevel(logging.WARNING)
    args.cache.mkdir(parents=True, exist_ok=True)
    ubm = {"ubm_from": args.ubm_from, "ubm_seed": args.ubm_seed, "ubm_frames": args.ubm_frames}
    st = build_stats(args.data, args.cache, ubm)
    extra = []
    for k in args.ubm_ensemble:
        st.update(build_ensemble(args.data, args.cache, k, args.ubm_frames))
        extra += [
            Variant(f"gmm_ens{k}", f"fuse80x{k}", "train", "cos"),
            Variant(f"shipped_stats&gmm_ens{k}", f"fuse80,80x{k}", "train", "cos"),
        ]
    if args.candidate:
        st.update(build_candidate(args.data, args.cache, args.candidate))
        extra.append(Variant("candidate_onnx", "-", "-", "cos"))
    boots = np.random.default_rng(5).multinomial(30, np.ones(30) / 30, size=args.boot).astype(float)
    every = variants() + extra
    vs = [v for v in every if not args.only or any(o in v.name for o in args.only)]
    vs = [v for v in every if v.name in (REF, SHIPPED) or v in vs]
    for v in vs:
        if "&" in v.feats:
            add_fused(st, v.feats)
    summ: dict[str, dict[str, np.ndarray]] = {}
    folds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    rows = []
    hdr = (
        f"{'variant':44s} {'trainCV':>7s} | {'devCV EER':>17s} {'devCV cm EER':>17s} {'ward EER':>17s} "
        f"{'top1/10':>6s} {'room8 top1':>17s} {'d_cm vs ref':>17s} {'d_room8 vs ref':>17s} "
        "| look: EER cm top1/30"
    )
    print(hdr, flush=True)
    for v in vs:
        tcv = train_cv(v, st) if not v.feats.endswith("_onnx") else float("nan")
        res = dev_cv(v, st, args.repeats, args.rooms)
        sm = summarise(res, boots)
        summ[v.name] = sm
        folds[v.name] = fold_figures(res)
        ref = summ.get(REF, sm)
        d_cm, d_r8 = sm["eer_cm"] - ref["eer_cm"], sm["room8"] - ref["room8"]
        look = one_look(v, st) if "dev" not in v.data else None
        row = {"variant": v.name, "train_cv_eer": tcv, "one_look": look}
        row.update({k: [float(a[0]), *np.nanpercentile(a[1:], [2.5, 97.5]).tolist()] for k, a in sm.items()})
        row["d_cm_vs_ref"] = [float(d_cm[0]), *np.nanpercentile(d_cm[1:], [2.5, 97.5]).tolist()]
        row["d_room8_vs_ref"] = [float(d_r8[0]), *np.nanpercentile(d_r8[1:], [2.5, 97.5]).tolist()]
        if SHIPPED in summ:
            for k, key in (("eer_cm", "d_cm_vs_shipped"), ("room8", "d_room8_vs_shipped")):
                dd = sm[k] - summ[SHIPPED][k]
                row[key] = [float(dd[0]), *np.nanpercentile(dd[1:], [2.5, 97.5]).tolist()]
        for other, tag in ((REF, "ref"), (SHIPPED, "shipped")):
            if other in folds and other != v.name:  # folds where this variant is better / worse
                (cm_o, r8_o), (cm_v, r8_v) = folds[other], folds[v.name]
                row[f"folds_vs_{tag}"] = {
                    "cm_lower": int(np.sum(cm_v < cm_o)), "cm_higher": int(np.sum(cm_v > cm_o)),
                    "room8_higher": int(np.sum(r8_v > r8_o)), "room8_lower": int(np.sum(r8_v < r8_o)),
                    "folds": len(cm_v),
                }  # fmt: skip
        rows.append(row)
        if args.json:  # after every row: a stopped run keeps what it measured
            args.json.write_text(json.dumps(rows, indent=1))
        lk = "-"
        if look:
            lk = f"{100 * look['eer']:4.1f} {100 * look['eer_cm']:4.1f} {100 * look['top1']:4.1f}"
        print(
            f"{v.name:44s} {100 * tcv:6.1f}% | {_ci(sm['eer'])} {_ci(sm['eer_cm'])} {_ci(sm['eer_ward'])} "
            f"{100 * sm['top1_10'][0]:5.1f}% {_ci(sm['room8'])} {_ci(d_cm)} {_ci(d_r8)} | {lk}",
            flush=True,
        )
        for tag in ("ref", "shipped"):
            if f := row.get(f"folds_vs_{tag}"):
                print(
                    f"{'':44s} folds vs {tag}: channel-matched EER lower in {f['cm_lower']}/{f['folds']} "
                    f"(higher {f['cm_higher']}), room-of-8 top-1 higher in {f['room8_higher']}/{f['folds']} "
                    f"(lower {f['room8_lower']})",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
