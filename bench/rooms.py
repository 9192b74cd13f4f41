"""Capacity of one daemon for a ward: N rooms, one microphone each, real cries at real speed (prints figures).

    .venv/bin/python bench/rooms.py [--seconds 20] [--max-rooms 64] [--model DIR] [--data DIR]

For N = 1, 2, 4, 8, 16, 32, ... one ``cryid run`` with N ``[[sources]]`` (one room each) replays N different
streams of real donateacry-cc recordings separated by room noise (``--seconds`` each, file sources played
at real speed, so each behaves as a microphone) against a real mosquitto, and measures:

- latency from the end of each expiration (``ended_at``) to the arrival of its PUBLISH at a subscriber:
  p50 / p95 / max over every room (the segmenter's ``hangover_ms`` is part of it, as in bench/daemon.py);
- audio lost: ``dropped_frames`` of the rooms' stats, and the real-time factor of the busiest room;
- CPU of the daemon process (share of one core, from the first cry to the end) and its peak RSS (VmHWM);
- the daemon's own figure from each room's last ``stats.stages`` (``end_to_puback``: from the last sample
  of an expiration heard to its PUBACK): the median of the rooms' p50 and the largest p95.

A step holds when p95 <= 150 ms and no audio was dropped; the bench stops at the first step that does not
and prints the largest N that held. No baby is enrolled (every cry is published as unknown: the decision
costs a dot product per enrolled baby, nothing beside the embedding). Print the load average beside the
figures: on a shared machine they say as much about the neighbours as about cryid.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import psutil
import soundfile as sf

from _common import DATA_DIR, Broker, DaemonEvents, child_env
from cryid.daemon import nursery
from cryid.daemon.config import Settings
from cryid.models.audio import SAMPLE_RATE, load_audio

GOAL_P95_MS = 150.0


def start_broker(workdir: Path) -> tuple[str, int, Callable[[], None]]:
    """A private mosquitto on a free port: (host, port, stop). The one place that starts the broker."""
    workdir.mkdir(parents=True, exist_ok=True)
    broker = Broker(workdir)
    broker.start()
    return broker.host, broker.port, broker.stop


def _streams(data: Path, n: int, seconds: float, out: Path) -> list[Path]:
    """``n`` streams of ``seconds``: real recordings (a different order per room) between room noise."""
    with open(data / "metadata.csv", newline="") as fh:
        files = [data / r["file_name"] for r in csv.DictReader(fh) if r["split"] == "dev"][:60]
    cache: dict[Path, np.ndarray] = {}
    paths = []
    for k in range(n):
        rng = np.random.default_rng(k)
        parts = [nursery.room_noise(float(rng.uniform(0.5, 3.0)), rng)]
        total = parts[0].size
        while total < seconds * SAMPLE_RATE:
            f = files[int(rng.integers(len(files)))]
            wav = cache.setdefault(f, load_audio(f))
            gap = nursery.room_noise(float(rng.uniform(2.0, 4.0)), rng)
            parts += [wav, gap]
            total += wav.size + gap.size
        path = out / f"room{k:02d}.wav"
        sf.write(path, np.concatenate(parts)[: int(seconds * SAMPLE_RATE)], SAMPLE_RATE, subtype="PCM_16")
        paths.append(path)
    return paths


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def step(n: int, streams: list[Path], host: str, port: int, work: Path, model: Path) -> dict[str, float]:
    """One daemon with ``n`` rooms; returns its figures."""
    cfg = work / f"rooms{n}.toml"
    cfg.write_text(
        "".join(
            f'[[sources]]\nname = "mic{k:02d}"\nroom = "room{k:02d}"\nfile = "{streams[k]}"\n\n'
            for k in range(n)
        )
    )
    sub = DaemonEvents(host, port, client_id=f"bench-rooms-{n}")
    state = work / f"state{n}"
    env = child_env(
        CRYID_STATE_DIR=str(state), CRYID_MODEL=str(model), CRYID_MQTT__HOST=host, CRYID_MQTT__PORT=str(port),
        CRYID_MQTT__STATS_INTERVAL_S="2", CRYID_MQTT__CLIENT_ID=f"cryid-bench-{n}",
    )  # fmt: skip
    load0 = os.getloadavg()[0]
    cmd = [sys.executable, "-m", "cryid.daemon.cli", "run", "--config", str(cfg)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    samples: list[tuple[float, float]] = []
    hwm = 0
    while proc.poll() is None:
        try:
            samples.append((time.time(), _cpu_s(ps)))
            with open(f"/proc/{proc.pid}/status") as fh:
                hwm = max([hwm] + [int(x.split()[1]) for x in fh if x.startswith("VmHWM:")])
        except (psutil.Error, OSError):
            break
        time.sleep(0.25)
    err = proc.stderr.read() if proc.stderr else ""
    time.sleep(0.5)
    sub.stop()
    arrivals, stats = sub.arrivals, sub.stats
    shutil.rmtree(state, ignore_errors=True)
    if proc.returncode != 0:
        print(err[-3000:])
        raise SystemExit(f"bench: cryid run with {n} rooms exited {proc.returncode}")
    lat = np.array(
        [
            (recv - datetime.fromisoformat(ev["ended_at"].replace("Z", "+00:00")).timestamp()) * 1000
            for recv, ev in arrivals
            if ev["kind"] == "expiration"
        ]
    )
    first = min((recv for recv, _ in arrivals), default=samples[0][0])
    pts = [(t, c) for t, c in samples if t >= first]
    cpu = (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]) if len(pts) >= 2 else float("nan")
    dropped = sum(
        max((s["dropped_frames"] for s in stats if s["room"] == r), default=0)
        for r in {s["room"] for s in stats}
    )
    rtf = max((s["realtime_factor"] or 0.0 for s in stats), default=float("nan"))
    last = {s["room"]: s for s in stats}  # each room's last stats: its stage figures over the whole run
    puback = [s["stages"]["end_to_puback"] for s in last.values() if "end_to_puback" in s.get("stages", {})]
    return {
        "n": n, "expirations": float(lat.size),
        "p50": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "p95": float(np.percentile(lat, 95)) if lat.size else float("nan"),
        "max": float(lat.max()) if lat.size else float("nan"),
        "dropped": float(dropped), "rtf": rtf, "cpu": cpu * 100, "rss_mb": hwm / 1024,
        "load": (load0 + os.getloadavg()[0]) / 2,
        "d_p50": float(np.median([f["p50_ms"] for f in puback])) if puback else float("nan"),
        "d_p95": max((f["p95_ms"] for f in puback), default=float("nan")),
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Settings().model)
    ap.add_argument("--data", type=Path, default=DATA_DIR)
    ap.add_argument("--seconds", type=float, default=20.0, help="audio per room and step")
    ap.add_argument("--max-rooms", type=int, default=64)
    args = ap.parse_args()
    if not (args.model / "model.onnx").is_file():
        sys.exit(f"bench: no model at {args.model}; give --model DIR")
    if not (args.data / "metadata.csv").is_file():
        sys.exit(f"bench: no real cries at {args.data}; give --data DIR")
    work = Path(tempfile.mkdtemp(prefix="cryid-bench-rooms-"))
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= args.max_rooms]
    streams = _streams(args.data, ns[-1], args.seconds, work)
    (work / "broker").mkdir()
    host, port, stop_broker = start_broker(work / "broker")
    cpus = len(os.sched_getaffinity(0))
    print(
        f"{cpus} CPUs; {args.seconds:.0f} s of real cries per room and step; goal p95 <= {GOAL_P95_MS:.0f} ms"
    )
    head = ("rooms", "expir.", "p50 ms", "p95 ms", "max ms", "dropped", "max rtf", "CPU %", "RSS MB", "load",
            "d.p50", "d.p95")  # fmt: skip
    print(" ".join(f"{h:>7}" for h in head))
    held = 0
    try:
        for n in ns:
            r = step(n, streams, host, port, work, args.model)
            cells = [f"{n:>7}", *(f"{r[k]:>7.0f}" for k in ("expirations", "p50", "p95", "max", "dropped"))]
            cells += [f"{r['rtf']:>7.3f}", f"{r['cpu']:>7.1f}", f"{r['rss_mb']:>7.0f}", f"{r['load']:>7.2f}"]
            cells += [f"{r['d_p50']:>7.0f}", f"{r['d_p95']:>7.0f}"]
            print(" ".join(cells), flush=True)
            if not (r["p95"] <= GOAL_P95_MS and r["dropped"] == 0):
                break
            held = n
    finally:
        stop_broker()
        shutil.rmtree(work, ignore_errors=True)
    print(f"largest number of rooms within the bound: {held or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
