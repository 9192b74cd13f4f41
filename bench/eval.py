"""Evaluation throughput: seconds of audio embedded per wall-clock second, ONNX embedder vs speechbrain.

Run: ``nice .venv/bin/python bench/eval.py --model DIR --speechbrain SRC [--data DIR] [--groups N]``.
Both embedders embed the same concatenations (the paper protocol's unit: all cries of a baby-period
of donateacry-cc dev) one at a time, as ``cryid eval`` does; the script prints each embedder's seconds
of audio per second, the ratio ONNX / speechbrain measured in this run, and the largest disagreement
(1 - cosine) between the two embeddings of a concatenation. A benchmark, not a test. Without
``--model``/``--speechbrain`` it builds the tests' seeded random ECAPA-TDNN (C=1024) and exports it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import DATA_DIR


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--split", default="dev")
    parser.add_argument("--groups", type=int, default=12, help="baby-period concatenations to embed")
    parser.add_argument("--model", type=Path, default=None, help="cryid model directory (ONNX)")
    parser.add_argument("--speechbrain", default=None, help="the same weights as a speechbrain source")
    args = parser.parse_args()

    from cryid.models.audio import load_audio
    from cryid.models.embedder import Embedder
    from cryid.models.evaluation.cryceleb import load_cryceleb
    from cryid.models.evaluation.embedders import SpeechbrainEmbedder

    with tempfile.TemporaryDirectory(prefix="cryid-bench-") as tmp:
        sb_src, model_dir = args.speechbrain, args.model
        if sb_src is None or model_dir is None:
            from _common import build_speechbrain_model_dir
            from cryid.models.training.export import export_model

            sb_src = str(build_speechbrain_model_dir(Path(tmp) / "sb"))
            model_dir = Path(tmp) / "onnx"
            export_model(sb_src, model_dir)
        data = load_cryceleb(args.data)
        groups = list(data.groups(args.split).values())[: args.groups]
        wavs = [np.concatenate([load_audio(r.path) for r in recs]) for recs in groups]
        audio_s = sum(len(w) for w in wavs) / 16000
        results = {}
        for name, embedder in (("onnx", Embedder(model_dir)), ("speechbrain", SpeechbrainEmbedder(sb_src))):
            embedder.embed(wavs[0])  # warm-up
            start = time.perf_counter()
            embs = np.stack([embedder.embed(w) for w in wavs])
            wall = time.perf_counter() - start
            results[name] = (audio_s / wall, embs)
            print(
                f"{name:12s}: {audio_s:.1f} s of audio in {wall:.2f} s = {audio_s / wall:.1f} s audio per s"
            )
        a, b = results["onnx"][1], results["speechbrain"][1]
        cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        print(
            f"ratio onnx / speechbrain: {results['onnx'][0] / results['speechbrain'][0]:.2f}x "
            f"({len(wavs)} concatenations); max 1 - cosine between embedders {float(np.max(1 - cos)):.2e}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
