"""Benchmark of `cryid run` replaying real cries at real speed, 3 times (not a test: prints figures).

    .venv/bin/python bench/daemon.py [--model DIR] [--data DIR] [--runs 3] [--files 5] [--gap-s 6]
                                     [--noise-s 15] [--silence-s 15]

Builds a stream of real donateacry-cc recordings (about 7 s each) separated by ``--gap-s`` of quiet
room noise, then ``--noise-s`` of room noise and ``--silence-s`` of digital silence (zeros), starts a
mosquitto on a free port (amqtt when mosquitto is missing), runs ``cryid run --source STREAM
--realtime`` as a separate process ``--runs`` times and measures, per run:

- latency from the end of each expiration (stream time, ``ended_at``) to the arrival of its PUBLISH
  at a subscriber (p50, p95, max). The segmenter must first hear ``hangover_ms`` without cry to know
  an expiration has ended, so that wait is part of the figure;
- the same path split into stages, from the daemon's own stamps (its last ``stats`` payload,
  :mod:`cryid.daemon.stages`): heard -> chunk read -> end detected -> embedded -> identified -> stored
  in the outbox -> handed to paho -> PUBACK (p50/p95 of each step);
- CPU of the daemon process over the quiet room noise and over the digital silence at the end;
- CPU while crying (share of one core over the cry bouts) and the daemon's real-time factor;
- peak RSS of the daemon (VmHWM);
- beside each run: the machine's load average and the embedder alone on a 1 s clip (ms), to compare
  machines.

Then the median and the spread (min-max) of each figure over the runs, and the goals, met or NOT met
in every run: p95 end of expiration -> PUBLISH <= 100 ms, CPU while silent (noise and zeros) <= 1 % of
a core, peak RSS <= 300 MB. Figures taken on a loaded machine say little: read the load average.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import soundfile as sf

from _common import DATA_DIR, Broker, DaemonEvents, child_env, free_port
from cryid.daemon import nursery
from cryid.daemon.config import Settings
from cryid.daemon.stages import STEPS
from cryid.models.audio import SAMPLE_RATE, load_audio

GOAL_P95_MS = 100.0
GOAL_IDLE_CPU = 0.01
GOAL_RSS_MB = 300.0


def _stream(
    data: Path, n_files: int, gap_s: float, noise_s: float, silence_s: float
) -> tuple[np.ndarray, list[tuple[float, float]], tuple[float, float], tuple[float, float]]:
    """The stream, its cry bouts, and the (start, end) seconds of the final noise and digital silence."""
    rng = np.random.default_rng(0)
    with open(data / "metadata.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "dev"][:n_files]
    parts = [nursery.room_noise(4.0, rng)]
    bouts = []
    pos = parts[0].size
    for r in rows:
        wav = load_audio(data / r["file_name"])
        bouts.append((pos / SAMPLE_RATE, (pos + wav.size) / SAMPLE_RATE))
        gap = nursery.room_noise(gap_s, rng)
        parts += [wav, gap]
        pos += wav.size + gap.size
    noise = nursery.room_noise(noise_s, rng)
    zeros = np.zeros(int(silence_s * SAMPLE_RATE), dtype=np.float32)
    noise_span = (pos / SAMPLE_RATE, (pos + noise.size) / SAMPLE_RATE)
    zero_span = (noise_span[1], noise_span[1] + zeros.size / SAMPLE_RATE)
    parts += [noise, zeros]
    return np.concatenate(parts), bouts, noise_span, zero_span


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def _embedder_reference(model: Path) -> float:
    from cryid.models.embedder import Embedder

    emb = Embedder(model)
    clip = nursery.expiration(nursery.voices(1)[0], 1.0, np.random.default_rng(0))
    emb.embed(clip)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        emb.embed(clip)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _one_run(
    args: argparse.Namespace,
    stream: Path,
    duration: float,
    bouts: list[tuple[float, float]],
    spans: dict[str, tuple[float, float]],
    host: str,
    port: int,
    work: Path,
    run: int,
) -> dict[str, Any]:
    sub = DaemonEvents(host, port, client_id=f"bench-sub-{run}")

    env = child_env(
        CRYID_STATE_DIR=str(work / f"state{run}"),
        CRYID_MODEL=str(args.model),
        CRYID_MQTT__HOST=host,
        CRYID_MQTT__PORT=str(port),
        CRYID_MQTT__STATS_INTERVAL_S="5",
    )
    cmd = [sys.executable, "-m", "cryid.daemon.cli", "run", "--source", str(stream), "--realtime"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    samples: list[tuple[float, float]] = []
    hwm = 0
    err_lines: list[str] = []
    drain = threading.Thread(target=lambda: err_lines.extend(proc.stderr or []), daemon=True)
    drain.start()
    while proc.poll() is None:
        try:
            samples.append((time.time(), _cpu_s(ps)))
            with open(f"/proc/{proc.pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        hwm = max(hwm, int(line.split()[1]))
        except (psutil.Error, OSError):
            break
        time.sleep(0.25)
    drain.join(timeout=5)
    time.sleep(0.3)  # the last stats
    sub.stop()
    arrivals, stats = sub.arrivals, sub.stats
    if proc.returncode != 0:
        print("".join(err_lines))
        sys.exit(f"bench: cryid run exited {proc.returncode}")

    lat = np.array(
        [(recv - _ts(ev["ended_at"])) * 1000 for recv, ev in arrivals if ev["kind"] == "expiration"]
    )
    first_start = min(_ts(ev["started_at"]) - ev["stream_offset_s"] for _, ev in arrivals)

    def cpu_between(t0: float, t1: float) -> float:
        pts = [(t, c) for t, c in samples if t0 <= t <= t1]
        if len(pts) < 2:
            return float("nan")
        return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])

    def span_cpu(name: str) -> float:
        a, b = spans[name]
        return cpu_between(first_start + a + 2.0, first_start + b - 0.5)

    crying = [cpu_between(first_start + a, first_start + b + 0.3) for a, b in bouts]
    rtfs = [s["realtime_factor"] for s in stats if s.get("realtime_factor") is not None]
    last = stats[-1] if stats else {}
    out: dict[str, Any] = {
        "expirations": int(lat.size),
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "p95_ms": float(np.percentile(lat, 95)) if lat.size else float("nan"),
        "max_ms": float(lat.max()) if lat.size else float("nan"),
        "cpu_noise": span_cpu("noise"),
        "cpu_zeros": span_cpu("zeros"),
        "cpu_crying": float(np.nanmean(crying)),
        "rtf_max": max(rtfs) if rtfs else float("nan"),
        "rss_mb": hwm / 1024,
        "stages": last.get("stages", {}),
    }
    return out


def _fmt_spread(vals: list[float], unit: str, digits: int = 0) -> str:
    a = np.array(vals, dtype=float)
    return f"{np.nanmedian(a):.{digits}f}{unit} ({np.nanmin(a):.{digits}f}-{np.nanmax(a):.{digits}f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Settings().model)
    ap.add_argument("--data", type=Path, default=DATA_DIR)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--files", type=int, default=5)
    ap.add_argument("--gap-s", type=float, default=6.0, help="room noise between the recordings")
    ap.add_argument("--noise-s", type=float, default=15.0, help="room noise at the end (idle CPU)")
    ap.add_argument("--silence-s", type=float, default=15.0, help="digital silence at the end (idle CPU)")
    args = ap.parse_args()
    if not (args.model / "model.onnx").is_file():
        sys.exit(f"bench: no model at {args.model}; give --model DIR")
    if not (args.data / "metadata.csv").is_file():
        sys.exit(f"bench: no real cries at {args.data}; give --data DIR")

    wav, bouts, noise_span, zero_span = _stream(
        args.data, args.files, args.gap_s, args.noise_s, args.silence_s
    )
    work = Path(tempfile.mkdtemp(prefix="cryid-bench-"))
    stream = work / "stream.wav"
    sf.write(stream, wav, SAMPLE_RATE)
    duration = wav.size / SAMPLE_RATE
    print(
        f"stream: {duration:.1f} s: {len(bouts)} real recordings, {args.gap_s:.0f} s room noise between, "
        f"then {args.noise_s:.0f} s room noise and {args.silence_s:.0f} s digital silence; {args.runs} runs"
    )

    if shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists():
        (work / "broker").mkdir()
        broker = Broker(work / "broker")
        broker.start()
        host, port, stop_broker = broker.host, broker.port, broker.stop
    else:
        from cryid.daemon.demo_mqtt import EmbeddedBroker

        port = free_port()
        eb = EmbeddedBroker(port)
        eb.start()
        host, stop_broker = "127.0.0.1", eb.stop

    runs: list[dict[str, Any]] = []
    try:
        for i in range(args.runs):
            load = os.getloadavg()
            ref_ms = _embedder_reference(args.model)
            r = _one_run(
                args, stream, duration, bouts, {"noise": noise_span, "zeros": zero_span}, host, port, work, i
            )
            r["load"], r["ref_ms"] = load, ref_ms
            runs.append(r)
            print(
                f"run {i + 1}: load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; embedder alone on a "
                f"1 s clip {ref_ms:.1f} ms; {r['expirations']} expirations; end of expiration -> PUBLISH "
                f"p50 {r['p50_ms']:.0f} ms, p95 {r['p95_ms']:.0f} ms, max {r['max_ms']:.0f} ms; "
                f"CPU room noise {r['cpu_noise'] * 100:.2f} %, digital silence "
                f"{r['cpu_zeros'] * 100:.2f} %, crying {r['cpu_crying'] * 100:.1f} %; "
                f"rtf max {r['rtf_max']:.3f}; peak RSS {r['rss_mb']:.0f} MB"
            )
    finally:
        stop_broker()
        shutil.rmtree(work, ignore_errors=True)

    print("\nstages (the daemon's own stamps, last stats of each run), ms: median of the runs (min-max)")
    print(f"{'step':<24} {'n':>4} {'p50':>22} {'p95':>22}")
    for _a, _b, name in STEPS:
        figs = [r["stages"].get(name) for r in runs]
        if not any(figs):
            continue
        p50 = [f["p50_ms"] if f else float("nan") for f in figs]
        p95 = [f["p95_ms"] if f else float("nan") for f in figs]
        n = int(np.median([f["n"] for f in figs if f]))
        print(f"{name:<24} {n:>4} {_fmt_spread(p50, '', 1):>22} {_fmt_spread(p95, '', 1):>22}")

    print("\nover the runs: median (min-max)")
    print(
        "  end of expiration -> PUBLISH at a subscriber: "
        f"p50 {_fmt_spread([r['p50_ms'] for r in runs], ' ms')}, "
        f"p95 {_fmt_spread([r['p95_ms'] for r in runs], ' ms')}, "
        f"max {_fmt_spread([r['max_ms'] for r in runs], ' ms')}"
    )
    print(
        f"  CPU room noise {_fmt_spread([r['cpu_noise'] * 100 for r in runs], ' %', 2)}, digital silence "
        f"{_fmt_spread([r['cpu_zeros'] * 100 for r in runs], ' %', 2)}, crying "
        f"{_fmt_spread([r['cpu_crying'] * 100 for r in runs], ' %', 1)} of one core"
    )
    print(
        f"  peak RSS {_fmt_spread([r['rss_mb'] for r in runs], ' MB')}; load average (1 min) "
        f"{_fmt_spread([r['load'][0] for r in runs], '', 2)}; embedder reference "
        f"{_fmt_spread([r['ref_ms'] for r in runs], ' ms', 1)}"
    )

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    p95_ok = all(r["p95_ms"] <= GOAL_P95_MS for r in runs)
    idle_ok = all(max(r["cpu_noise"], r["cpu_zeros"]) <= GOAL_IDLE_CPU for r in runs)
    rss_ok = all(r["rss_mb"] <= GOAL_RSS_MB for r in runs)
    print("\ngoals (in every run):")
    print(f"  p95 end of expiration -> PUBLISH <= {GOAL_P95_MS:.0f} ms: {verdict(p95_ok)}")
    print(
        f"  CPU while silent (room noise and digital silence) <= {GOAL_IDLE_CPU * 100:.0f} % of a core: "
        f"{verdict(idle_ok)}"
    )
    print(f"  peak RSS <= {GOAL_RSS_MB:.0f} MB: {verdict(rss_ok)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
