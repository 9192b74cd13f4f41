"""Segmenter CPU: 60 s of silence and of steady room noise against 60 s of real crying.

Run: ``.venv/bin/python bench/segmenter.py [--data DIR] [--repeat N] [--chunk-ms 100]``.
Prints CPU seconds per minute of audio, the share of one core, the frames that reached the VAD,
and each case's ratio to crying (measured in the same run). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from _common import DATA_DIR
from cryid.models.audio import SAMPLE_RATE, load_audio
from cryid.models.segmenter import Segmenter

SECONDS = 60


def crying(data: Path) -> np.ndarray:
    files = sorted((data / "audio" / "dev").rglob("*.flac"))
    if not files:
        raise SystemExit(f"no FLAC files under {data}/audio/dev; pass --data DIR (donateacry-cc)")
    wav = np.concatenate([load_audio(f) for f in files[: 2 * SECONDS // 7 + 2]])
    return wav[: SECONDS * SAMPLE_RATE]


def brown_noise(rng: np.random.Generator, n: int, level_dbfs: float) -> np.ndarray:
    """Steady low-frequency room rumble (integrated white noise, high-passed at ~20 Hz)."""
    x = np.cumsum(rng.standard_normal(n))
    x -= np.convolve(x, np.ones(801) / 801, mode="same")
    return (x / np.sqrt(np.mean(x**2)) * 10 ** (level_dbfs / 20)).astype(np.float32)


def measure(wav: np.ndarray, chunk: int, repeat: int) -> tuple[float, int, int, int]:
    best = float("inf")
    for _ in range(repeat):
        seg = Segmenter()
        t0 = time.process_time()
        n = 0
        for i in range(0, wav.size, chunk):
            n += len(seg.process(wav[i : i + chunk]))
        n += len(seg.flush())
        best = min(best, time.process_time() - t0)
    return best, n, seg.frames_vad, seg.frames_total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA_DIR)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--chunk-ms", type=int, default=100)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = SECONDS * SAMPLE_RATE
    cases = {
        "crying (real, donateacry-cc dev)": crying(args.data),
        "digital silence": np.zeros(n, np.float32),
        "quiet room (white noise -60 dBFS)": rng.normal(0, 10 ** (-60 / 20), n).astype(np.float32),
        "steady noise (white -35 dBFS)": rng.normal(0, 10 ** (-35 / 20), n).astype(np.float32),
        "steady rumble (brown -30 dBFS)": brown_noise(rng, n, -30.0),
    }
    chunk = SAMPLE_RATE * args.chunk_ms // 1000
    results = {name: measure(wav, chunk, args.repeat) for name, wav in cases.items()}
    ref = results["crying (real, donateacry-cc dev)"][0]
    print(f"segmenter CPU per {SECONDS} s of audio, chunks of {args.chunk_ms} ms, best of {args.repeat}")
    print(f"{'case':36s} {'cpu ms':>8s} {'% core':>7s} {'vs cry':>7s} {'VAD frames':>11s} {'expir.':>6s}")
    for name, (cpu, found, vad, total) in results.items():
        print(
            f"{name:36s} {cpu * 1e3:8.1f} {100 * cpu / SECONDS:6.3f}% {cpu / ref:7.2f} "
            f"{vad:5d}/{total:<5d} {found:6d}"
        )


if __name__ == "__main__":
    main()
