"""Which inputs should the confidence map use? The same 5-fold CV over dev infants as
``cryid model calibrate`` (rooms of 8, 2 strangers, K=0 and K=1 confirmed files), one line per set of
``calibration.KNOWN_FEATURES``, then the table of min_confidence against coverage and wrong-baby rate
(95% infant-bootstrap intervals) for the first and the last set.

    python bench/calibration_inputs.py [--data DIR] [--weight 1.0] [--sets legacy,confirmed]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from _common import DATA_DIR
from cryid.models.calibration import LEGACY_FEATURES, expected_calibration_error, log_loss
from cryid.models.config import DEFAULT_MODEL_DIR, SegmenterSettings
from cryid.models.embedder import Embedder
from cryid.models.evaluation.cryceleb import load_cryceleb
from cryid.models.evaluation.embedders import EmbeddingCache, Throughput, default_cache_dir
from cryid.models.evaluation.ward import CURVE, coverage, draw_rooms, score_rooms, wrong_rate
from cryid.models.evaluation.ward_eval import split_ward_data
from cryid.models.training.calibrate import (
    CalibrateSettings,
    _cv_predictions,
    _operating,
    _recommend,
    _restrict,
)

CONFIRMED = ("best_confirmed", "confirmed_best_score", "confirmed_margin")
SETS = {
    "legacy": LEGACY_FEATURES,
    "best_confirmed": (*LEGACY_FEATURES, "best_confirmed"),
    "confirmed": (*LEGACY_FEATURES, *CONFIRMED),
    "confirmed+runner": (*LEGACY_FEATURES, *CONFIRMED, "runner_confirmed"),
    "confirmed+expirations": (*LEGACY_FEATURES, *CONFIRMED, "log_expirations"),
    "confirmed+best_minus_mean": (*LEGACY_FEATURES, *CONFIRMED, "best_minus_mean"),
    "best_minus_mean": (*LEGACY_FEATURES, "best_minus_mean"),
}
TABLE = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.96, 0.98)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ci(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA_DIR)
    ap.add_argument("--weight", type=float, default=1.0, help="confirmed_weight (the shipped fit's choice)")
    ap.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {list(SETS)}")
    args = ap.parse_args()
    s = CalibrateSettings()
    emb = Embedder(DEFAULT_MODEL_DIR)
    data = load_cryceleb(args.data)
    cache = EmbeddingCache(default_cache_dir(), emb.sha256)
    ward, _ = split_ward_data(data, s.split, emb, SegmenterSettings(), cache, Throughput())
    pool = [b for b in ward.pool if b in ward.birth and ward.d_files.get(b)]
    ward = _restrict(ward, set(pool))
    rng = np.random.default_rng([s.seed, 1])
    order = [pool[i] for i in rng.permutation(len(pool))]
    folds = [set(order[f :: s.folds]) for f in range(s.folds)]
    rooms = draw_rooms(ward, s.room_size, s.strangers, s.rooms, s.seed)
    tests = {k: score_rooms(ward, rooms, k, args.weight, s.seed) for k in (0, 1)}
    short = {k: score_rooms(ward, rooms, k, args.weight, s.seed, prefixes=True) for k in (0, 1)}
    names = args.sets.split(",")
    kept = {}
    for name in names:
        feats = SETS[name]
        preds = _cv_predictions(ward, folds, {**tests, 2: short[0], 3: short[1]}, s, args.weight, feats)
        curves = {
            k: [(t, coverage(tests[k], preds[k] >= t), wrong_rate(tests[k], preds[k] >= t),
                 int((preds[k] >= t).sum())) for t in CURVE]
            for k in (0, 1)
        }  # fmt: skip
        rec = _recommend(curves, s) or CURVE[-1]
        p = np.concatenate([preds[0], preds[1]])
        y = np.concatenate([tests[0].correct, tests[1].correct])
        ece = expected_calibration_error(p, y)
        line = f"{name:26s} log loss {log_loss(p, y):.4f} ECE {ece:.3f} rec {rec:g}"
        for k, label in ((0, "K0"), (1, "K1"), (2, "K0 short"), (3, "K1 short")):
            q = tests[k] if k < 2 else short[k - 2]
            named = preds[k] >= rec
            line += f" | {label} {_pct(coverage(q, named))}/{_pct(wrong_rate(q, named))}"
        print(line, flush=True)
        kept[name] = (preds, rec)
    for name in (names[0], names[-1]):
        preds, rec = kept[name]
        print(f"\n{name}: min_confidence -> coverage [CI] / wrong baby [CI] (named), rooms of {s.room_size}")
        for t in sorted({*TABLE, rec}):
            cells = []
            for k in (0, 1):
                op = _operating(tests[k], preds[k], k, t, s)
                cells.append(
                    f"K={k}: {_pct(op.coverage)}{_ci(op.coverage_ci)} / "
                    f"{_pct(op.wrong_rate)}{_ci(op.wrong_rate_ci)} ({op.named})"
                )
            print(f"  {t:.2f}{' (rec)' if t == rec else ''}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
