"""What one nurse-confirmed cry per baby is worth: top-1 in rooms of 8 dev infants.

Each baby is enrolled from its birth (B) recordings; one of its discharge (D) recordings is "confirmed";
its other D recordings are identified (one episode each: the centroid of its expirations). Three ways
to use the confirmed cry: not at all, averaged into the birth centroid, or as a separate reference
(``ReferenceSet`` with weight ``--weight``, as the daemon does). Shipped model, daemon's segmenter.

    python bench/confirm_gain.py [--data DIR] [--rooms 200] [--weight 0.75]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from _common import DATA_DIR
from cryid.models.audio import load_audio
from cryid.models.config import DEFAULT_MODEL_DIR, SegmenterSettings
from cryid.models.embedder import Embedder
from cryid.models.pipeline import embed_expirations
from cryid.models.scoring import ReferenceSet, centroid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA_DIR)
    ap.add_argument("--rooms", type=int, default=200)
    ap.add_argument("--weight", type=float, default=0.75)
    args = ap.parse_args()
    with open(args.data / "metadata.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "dev"]
    embedder, seg = Embedder(DEFAULT_MODEL_DIR), SegmenterSettings()
    births: dict[str, list[np.ndarray]] = {}
    later: dict[str, list[np.ndarray]] = {}
    for r in rows:
        items = embed_expirations(load_audio(args.data / r["file_name"]), seg, embedder)
        if items:
            (births if r["period"] == "B" else later).setdefault(r["baby_id"], []).append(
                np.stack([i.embedding for i in items])
            )
    ids = sorted(b for b in births if len(later.get(b, [])) >= 2)
    print(f"{len(ids)} dev infants with birth cries and >= 2 discharge recordings with cries")
    rng = np.random.default_rng(0)
    hits: dict[str, list[bool]] = {"birth only": [], "averaged in": [], "separate reference": []}
    for _ in range(args.rooms):
        room = [str(b) for b in rng.choice(ids, size=8, replace=False)]
        birth = {b: centroid(np.concatenate(births[b])) for b in room}
        confirmed: dict[str, np.ndarray] = {}
        tests: list[tuple[str, np.ndarray]] = []
        for b in room:
            k = int(rng.integers(len(later[b])))
            confirmed[b] = later[b][k]
            tests += [(b, centroid(v)) for j, v in enumerate(later[b]) if j != k]
        sets = {
            "birth only": ReferenceSet(birth),
            "averaged in": ReferenceSet(
                {b: centroid(np.concatenate([*births[b], confirmed[b]])) for b in room}
            ),
            "separate reference": ReferenceSet(
                birth, {b: centroid(v) for b, v in confirmed.items()}, args.weight
            ),
        }
        for name, refs in sets.items():
            hits[name] += [refs.ids[int(np.argmax(refs.scores(q)))] == b for b, q in tests]
    for name, h in hits.items():
        print(f"{name:20s} top-1 {np.mean(h):.3f} ({len(h)} episodes in {args.rooms} rooms of 8)")


if __name__ == "__main__":
    main()
