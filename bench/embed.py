"""Speed and agreement of the ONNX Embedder (fp32, int8) against speechbrain eager PyTorch, side by side.

    .venv/bin/python bench/embed.py [--src SPEECHBRAIN_DIR] [--data ../shared/data/donateacry-cc]

Clips of 1 s, 3 s and 10 s are cut from real cries (dev files of donateacry-cc concatenated, so a
10 s clip spans several recordings). Each method embeds the same clips in the same run, in
interleaved rounds, with the same thread count (default 2): speechbrain
``EncoderClassifier.encode_batch(wav, normalize=False)`` with ``torch.set_num_threads``, and the
``Embedder`` (NumPy front end + onnxruntime) with ``intra_op_threads``. It prints the median ms per
clip, the speed-up over speechbrain and the cosine agreement. Without --src it builds the seeded
random ECAPA-TDNN of the tests (published size, C=1024): speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Idle torch (OpenMP) threads sleep instead of spinning, as onnxruntime's do in the Embedder: spinning
# workers of one method would steal the CPU from the next one in the interleaved rounds.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from _common import DATA_DIR
from cryid.models.audio import load_audio
from cryid.models.config import EmbedderSettings
from cryid.models.embedder import Embedder
from cryid.models.scoring import cosine
from cryid.models.training.export import export_model


def real_cry_clips(data: Path, seconds: list[float], per_length: int) -> dict[float, list[np.ndarray]]:
    import csv

    with open(data / "metadata.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "dev"]
    stream = np.concatenate([load_audio(data / r["file_name"]) for r in rows[:40]])
    clips: dict[float, list[np.ndarray]] = {}
    for s in seconds:
        n = int(s * 16000)
        starts = np.linspace(0, len(stream) - n, per_length).astype(int)
        clips[s] = [stream[a : a + n].copy() for a in starts]
    return clips


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default=None, help="speechbrain model dir (default: seeded random C=1024 ECAPA)")
    ap.add_argument("--data", type=Path, default=DATA_DIR)
    ap.add_argument("--threads", type=int, default=2, help="threads for torch and onnxruntime")
    ap.add_argument("--seconds", type=float, nargs="+", default=[1.0, 3.0, 10.0])
    ap.add_argument("--clips", type=int, default=4, help="clips per length")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument(
        "--no-int8",
        action="store_true",
        help="fp32 only (for a model int8 cannot represent: the shipped statistics ECAPA)",
    )
    args = ap.parse_args()
    variants = ["fp32"] if args.no_int8 else ["fp32", "int8"]

    import torch

    from cryid.models.evaluation.embedders import SpeechbrainEmbedder

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="cryid-bench-"))
    src = args.src
    if src is None:
        from _common import build_speechbrain_model_dir

        src = str(build_speechbrain_model_dir(work / "sb-ecapa"))
    print(f"exporting {src} ({' and '.join(variants)}) ...", flush=True)
    for v in variants:
        export_model(src, work / v, quantize=None if v == "fp32" else v)
    settings = EmbedderSettings(intra_op_threads=args.threads, inter_op_threads=1)
    methods = {f"onnx-{v}": Embedder(work / v, settings).embed for v in variants}
    # a learned back-end and a GMM branch in SRC are inside the ONNX graph: the speechbrain side applies
    # them too (the embedder `cryid eval --speechbrain` uses)
    sb_embed = SpeechbrainEmbedder(src).embed

    def sb_embed_1t(wav: np.ndarray) -> np.ndarray:
        # The same eager model with one torch thread: on a busy machine torch's 2-thread OpenMP pool
        # can be many times slower than one thread, which would flatter the ONNX ratios.
        torch.set_num_threads(1)
        try:
            return sb_embed(wav)
        finally:
            torch.set_num_threads(args.threads)

    methods = {"speechbrain": sb_embed, "speechbrain-1t": sb_embed_1t, **methods}
    frontend = Embedder(work / "fp32", settings).frontend
    clips = real_cry_clips(args.data, args.seconds, args.clips)
    times: dict[tuple[str, float], list[float]] = {(m, s): [] for m in methods for s in clips}
    embs: dict[tuple[str, float], list[np.ndarray]] = {}
    for s, cl in clips.items():  # warm-up, and the embeddings for the agreement figures
        for m, fn in methods.items():
            embs[(m, s)] = [fn(c) for c in cl]
    for _ in range(args.rounds):
        for s, cl in clips.items():
            for m, fn in methods.items():
                for c in cl:
                    t0 = time.perf_counter()
                    fn(c)
                    times[(m, s)].append((time.perf_counter() - t0) * 1000)
    fe_ms = {s: statistics.median(_timed(frontend.features, cl, 3)) for s, cl in clips.items()}

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\n{args.threads} threads each; median ms per clip over {args.rounds} rounds x {args.clips} clips; "
        f"load average {load:.1f} on {os.cpu_count()} CPUs; OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    header = (
        f"{'clip':>5} {f'sb {args.threads}t':>8} {'sb 1t':>8} "
        + "".join(f"{v:>7} {v + ' x':>7} {v + ' x1t':>8} " for v in variants)
        + f"{'fe ms':>6}  "
        + "  ".join(f"cos {v}/sb" for v in variants)
        + ("  cos int8/fp32" if "int8" in variants else "")
    )
    print(header)
    results = []
    for s in clips:
        med = {m: statistics.median(times[(m, s)]) for m in methods}

        def agree(a: str, b: str, s: float = s) -> float:
            return min(cosine(x, y) for x, y in zip(embs[(a, s)], embs[(b, s)], strict=True))

        cos = {f"min_cos_{v}_sb": agree(f"onnx-{v}", "speechbrain") for v in variants}
        if "int8" in variants:
            cos["min_cos_int8_fp32"] = agree("onnx-int8", "onnx-fp32")
        up = {
            f"{v}{suffix}": med[ref] / med[f"onnx-{v}"]
            for v in variants
            for ref, suffix in (("speechbrain", ""), ("speechbrain-1t", "_vs_sb_1thread"))
        }
        print(
            f"{s:>4.0f}s {med['speechbrain']:>8.1f} {med['speechbrain-1t']:>8.1f} "
            + "".join(
                f"{med[f'onnx-{v}']:>7.1f} {up[v]:>6.2f}x {up[f'{v}_vs_sb_1thread']:>7.2f}x "
                for v in variants
            )
            + f"{fe_ms[s]:>6.2f}  "
            + "  ".join(f"{c:>11.6f}" for c in cos.values())
        )
        results.append({"seconds": s, "ms": med, "speedup": up, "frontend_ms": fe_ms[s], **cos})
    one = next((r for r in results if r["seconds"] == 1.0), None)
    if one is not None:
        up = one["speedup"]
        goals = {"fp32": 2.5, "int8": 4.0}
        print(
            f"\ngoals on 1 s clips (vs speechbrain, {args.threads} threads): "
            + "; ".join(
                f"{v} >= {goals[v]:g}x: {up[v]:.2f}x ({'met' if up[v] >= goals[v] else 'NOT met'})"
                for v in variants
            )
            + "; against speechbrain's faster 1-thread run: "
            + ", ".join(f"{v} {up[f'{v}_vs_sb_1thread']:.2f}x" for v in variants)
        )
    if args.json:
        args.json.write_text(
            json.dumps({"threads": args.threads, "load_average": load, "results": results}, indent=2)
        )
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _timed(fn, clips: list[np.ndarray], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        for c in clips:
            t0 = time.perf_counter()
            fn(c)
            out.append((time.perf_counter() - t0) * 1000)
    return out


if __name__ == "__main__":
    sys.exit(main())
