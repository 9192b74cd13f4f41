"""``cryid model calibrate``: fit a model's score-to-probability map in simulated ward rooms.

On a split of infants the model was not trained on (dev for the shipped model):
1. every file is segmented and embedded as the daemon does (``ward_eval.split_ward_data``);
2. the infants are split into ``folds`` seeded folds. For each fold, a map is fitted on rooms drawn
   from the *other* folds' infants only (rooms of several sizes, a quarter strangers, with 0 and 1
   confirmed D files per enrolled baby), and predicts the held-out infants' queries in fixed rooms of
   ``room_size`` (K=0 and K=1), so every reported figure is cross-validated over infants;
3. ``confirmed_weight`` is the value of ``weight_grid`` with the lowest CV log loss on the K=1 queries;
4. the recommended ``min_confidence`` is the lowest value of ``ward.CURVE`` from which on the CV
   wrong-baby rate stays at or below ``target_wrong_rate`` for both K=0 and K=1; where fewer than
   ``min_named`` queries are named, the wrong names may not exceed ``target_wrong_rate * min_named``
   (one in 20 by default), so a few lucky names at the top cannot pass and a few unlucky ones do not
   condemn a threshold;
5. the map is refitted on every infant and written into ``manifest.json`` (temp file + rename; the
   ONNX file is not touched), with the CV figures in ``calibration.metrics``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cryid.models.calibration import (
    FEATURES,
    Calibration,
    CalibrationError,
    ReliabilityBin,
    expected_calibration_error,
    fit_calibration,
    log_loss,
    reliability,
)
from cryid.models.config import SegmenterSettings
from cryid.models.evaluation.cryceleb import CryCelebError, load_cryceleb
from cryid.models.evaluation.embedders import EmbeddingCache, Throughput
from cryid.models.evaluation.metrics import bootstrap_ci, infant_codes
from cryid.models.evaluation.ward import (
    CURVE,
    RoomQueries,
    WardData,
    coverage,
    draw_rooms,
    query_confidences,
    score_rooms,
    wrong_rate,
)
from cryid.models.evaluation.ward_eval import split_ward_data
from cryid.models.files import atomic_write
from cryid.models.manifest import MANIFEST_NAME, Manifest
from cryid.models.training.settings import CalibrateSettings

logger = logging.getLogger(__name__)

FIT_ROOM_SIZES = (2, 4, 6, 8, 12, 16)  # the map must hold for any number of candidates


@dataclass(frozen=True)
class Operating:
    """Cross-validated coverage and wrong-baby rate at one min_confidence, for K confirmations."""

    confirm: int
    min_confidence: float
    coverage: float | None
    wrong_rate: float | None
    coverage_ci: tuple[float, float] | None
    wrong_rate_ci: tuple[float, float] | None
    top1: float | None
    named: int
    queries: int


@dataclass(frozen=True)
class CalibrationResult:
    """What ``calibrate_model`` found and wrote."""

    calibration: Calibration
    weight_log_loss: dict[float, float]  # CV log loss of the K=1 queries per confirmed_weight
    curves: dict[int, list[tuple[float, float | None, float | None, int]]]  # K -> (t, coverage, wrong, named)
    reliability: list[ReliabilityBin]
    operating: list[Operating]
    infants: int
    manifest_path: Path


def _restrict(ward: WardData, infants: set[str]) -> WardData:
    return WardData(
        birth={b: v for b, v in ward.birth.items() if b in infants},
        d_files={b: v for b, v in ward.d_files.items() if b in infants},
        pool=tuple(b for b in ward.pool if b in infants),
    )


def _fit_rooms(
    ward: WardData,
    settings: CalibrateSettings,
    seed: int,
    weight: float,
    features: tuple[str, ...] = FEATURES,
) -> RoomQueries:
    """Queries of mixed-size rooms with 0 and 1 confirmations: what a map is fitted on. With
    ``log_expirations`` among the map's features, the same rooms again with episodes cut to their first
    1..n expirations (``score_rooms(prefixes=True)``). (Adding K=1 rooms where only half the babies have
    a confirmed reference, ``confirm_share=0.5``, was measured and lowered the CV coverage.)"""
    sizes = [s for s in FIT_ROOM_SIZES if s <= len(ward.pool)] or [len(ward.pool)]
    per_size = max(1, settings.rooms // len(sizes))
    parts = []
    for i, size in enumerate(sizes):
        s = seed * 1000 + i
        rooms = draw_rooms(ward, size, max(1, size // 4) if size > 1 else 0, per_size, s)
        parts += [score_rooms(ward, rooms, k, weight, s) for k in (0, 1)]
        if "log_expirations" in features:
            parts += [score_rooms(ward, rooms, k, weight, s + 700, prefixes=True) for k in (0, 1)]
    return RoomQueries.concat(parts)


def _fit(q: RoomQueries, features: tuple[str, ...] = FEATURES, **info: Any) -> Calibration:
    rows = [s for s, e in zip(q.scores, q.enrolled, strict=True) if e]
    return fit_calibration(
        q.best,
        q.margin,
        q.n_candidates,
        q.correct,
        rows,
        [int(t) for t in q.true_index[q.enrolled]],
        features=features,
        best_confirmed=q.best_confirmed,
        runner_confirmed=q.runner_confirmed,
        expirations=q.n_expirations,
        others_mean=q.others_mean,
        **info,
    )


def _cv_predictions(
    ward: WardData,
    folds: list[set[str]],
    test: dict[int, RoomQueries],
    settings: CalibrateSettings,
    weight: float,
    features: tuple[str, ...] = FEATURES,
) -> dict[int, np.ndarray]:
    """Each test query's probability from the map fitted without its infant's fold."""
    preds = {k: np.full(len(q), np.nan) for k, q in test.items()}
    for f, held in enumerate(folds):
        train = _restrict(ward, set(ward.pool) - held)
        cal = _fit(_fit_rooms(train, settings, settings.seed + 7919 * (f + 1), weight, features), features)
        for k, q in test.items():
            m = np.isin(q.infant, list(held))
            preds[k][m] = query_confidences(q, cal)[m]
    return preds


def _recommend(
    curves: dict[int, list[tuple[float, float | None, float | None, int]]], settings: CalibrateSettings
) -> float | None:
    ok = np.ones(len(CURVE), dtype=bool)
    for curve in curves.values():
        bad = [
            named > 0
            and (w or 0.0) * named > settings.target_wrong_rate * max(named, settings.min_named) + 1e-9
            for _, _, w, named in curve
        ]
        ok &= ~np.maximum.accumulate(np.array(bad)[::-1])[::-1]  # no bad value at or above
    good = [t for t, g in zip(CURVE, ok, strict=True) if g]
    return good[0] if good else None


def calibrate_model(
    model_dir: Path,
    data_dir: Path,
    settings: CalibrateSettings,
    segmenter: SegmenterSettings,
    embedder_settings: Any = None,
    cache_dir: Path | None = None,
    data_label: str | None = None,
) -> CalibrationResult:
    """Fit, cross-validate and store ``model_dir``'s calibration (see the module docstring)."""
    from cryid.models.embedder import Embedder

    model_dir = Path(model_dir)
    embedder = Embedder(model_dir, embedder_settings)  # checks the manifest, the sha256 and the graph
    manifest_path = model_dir / MANIFEST_NAME
    before = manifest_path.read_bytes()
    data = load_cryceleb(data_dir)
    if not data.split_recordings(settings.split):
        raise CryCelebError(
            f"{data.root}/metadata.csv: no recordings in split {settings.split!r}; "
            "pick a split with B and D recordings (--split)"
        )
    data.check_audio(settings.split)
    ward, _ = split_ward_data(
        data, settings.split, embedder, segmenter, EmbeddingCache(cache_dir, embedder.sha256), Throughput()
    )
    pool = [b for b in ward.pool if b in ward.birth and ward.d_files.get(b)]
    if len(pool) < max(settings.room_size, 2 * settings.folds):
        raise CalibrationError(
            f"{data.root} split {settings.split}: {len(pool)} infants with usable B and D recordings; "
            f"calibration needs at least {max(settings.room_size, 2 * settings.folds)} "
            "(lower --room-size or use a larger split)"
        )
    ward = _restrict(ward, set(pool))
    rng = np.random.default_rng([settings.seed, 1])
    order = [pool[i] for i in rng.permutation(len(pool))]
    folds = [set(order[f :: settings.folds]) for f in range(settings.folds)]
    rooms = draw_rooms(ward, settings.room_size, settings.strangers, settings.rooms, settings.seed)
    test0 = score_rooms(ward, rooms, 0, 0.0, settings.seed)
    losses, preds_by_w, tests_by_w = {}, {}, {}
    for w in settings.weight_grid:
        tests = {0: test0, 1: score_rooms(ward, rooms, 1, w, settings.seed)}
        preds = _cv_predictions(ward, folds, tests, settings, w)
        losses[w] = log_loss(preds[1], tests[1].correct)
        preds_by_w[w], tests_by_w[w] = preds, tests
        logger.info("confirmed_weight %s: CV log loss (K=1) %.4f", w, losses[w])
    weight = min(settings.weight_grid, key=lambda w: (losses[w], -w))
    preds, tests = preds_by_w[weight], tests_by_w[weight]
    curves = {}
    for k, q in tests.items():
        correct = q.correct
        curves[k] = [
            (
                t,
                coverage(q, preds[k] >= t),
                wrong_rate(q, preds[k] >= t, correct=correct),
                int((preds[k] >= t).sum()),
            )
            for t in CURVE
        ]
    recommended = _recommend(curves, settings)
    if recommended is None:
        recommended = CURVE[-1]
        logger.warning(
            "no min_confidence keeps the CV wrong-baby rate at or below %s; recommending %s",
            settings.target_wrong_rate,
            recommended,
        )
    all_p = np.concatenate([preds[0], preds[1]])
    all_y = np.concatenate([tests[0].correct, tests[1].correct])
    metrics: dict[str, float] = {
        "recommended_min_confidence": recommended,
        "target_wrong_rate": settings.target_wrong_rate,
        "cv_log_loss": log_loss(all_p, all_y),
        "cv_ece": expected_calibration_error(all_p, all_y),
        "cv_base_rate": float(np.mean(all_y)),
        "cv_mean_confidence": float(np.mean(all_p)),
        "infants": float(len(pool)),
        "folds": float(settings.folds),
    }
    operating = []
    for k, q in tests.items():
        op = _operating(q, preds[k], k, recommended, settings)
        operating.append(op)
        for name in ("coverage", "wrong_rate", "top1"):
            value = getattr(op, name)
            if value is not None:
                metrics[f"cv_{name}_k{k}"] = value
        for name in ("coverage_ci", "wrong_rate_ci"):
            ci = getattr(op, name)
            if ci is not None:
                metrics[f"cv_{name[:-3]}_k{k}_ci_low"], metrics[f"cv_{name[:-3]}_k{k}_ci_high"] = ci
    label = data_label or str(data_dir)
    calibration = _fit(
        _fit_rooms(ward, settings, settings.seed, weight),
        data=f"{label} split {settings.split}: {len(pool)} infants; rooms of {list(FIT_ROOM_SIZES)} babies "
        f"(a quarter strangers) with 0 and 1 confirmed D files; operating point and CV figures in "
        f"{settings.rooms} rooms of {settings.room_size} ({settings.strangers} strangers), "
        f"{settings.folds}-fold CV over infants",
        fitted_at=datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        room_size=settings.room_size,
        room_strangers=settings.strangers,
        rooms=settings.rooms,
        seed=settings.seed,
        metrics=metrics,
        confirmed_weight=weight,
    )
    manifest = embedder.manifest.model_copy(update={"calibration": calibration})
    _write_manifest_atomic(manifest, manifest_path, before)
    return CalibrationResult(
        calibration, losses, curves, reliability(all_p, all_y), operating, len(pool), manifest_path
    )


def _operating(q: RoomQueries, p: np.ndarray, k: int, t: float, settings: CalibrateSettings) -> Operating:
    named, correct = p >= t, q.correct
    codes, n = infant_codes(q.infant)
    cov, wr = coverage(q, named), wrong_rate(q, named, correct=correct)

    def ci(fn: Any) -> tuple[float, float] | None:
        if not settings.bootstrap:
            return None
        return bootstrap_ci(n, lambda c: fn(c[codes]), settings.bootstrap, settings.seed)

    top1 = float(np.mean(correct[q.enrolled])) if q.enrolled.any() else None
    return Operating(
        k,
        t,
        cov,
        wr,
        None if cov is None else ci(lambda w: coverage(q, named, w)),
        None if wr is None else ci(lambda w: wrong_rate(q, named, w, correct)),
        top1,
        int(named.sum()),
        len(q),
    )


def _write_manifest_atomic(manifest: Manifest, path: Path, before: bytes) -> None:
    """Replace ``path`` with ``manifest`` via a temporary file and a rename; refuse if it changed since
    it was read (another writer), so nothing is lost or half-written."""
    text = manifest.model_dump_json(indent=2) + "\n"
    Manifest.model_validate_json(text)  # what is written must load
    if path.read_bytes() != before:
        raise CalibrationError(f"{path}: changed while calibrating; run `cryid model calibrate` again")
    atomic_write(path, text)  # keeps the manifest's mode: the service user reads the model directory
