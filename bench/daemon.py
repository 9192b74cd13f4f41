"""Benchmark of `cryid run` replaying real cries at real speed (not a test: prints figures).

    .venv/bin/python bench/daemon.py [--model DIR] [--data DIR] [--files 6] [--silence-s 30]

Builds a stream of real donateacry-cc recordings (about 7 s each) separated by 8 s of room noise and
ending with ``--silence-s`` of room noise, starts a mosquitto on a free port (amqtt when mosquitto is
missing), runs ``cryid run --source STREAM --realtime`` as a separate process and measures:

- latency from the end of each expiration (stream time, ``ended_at``) to the arrival of its PUBLISH
  at a subscriber (p50, p95, max); goal p95 <= 150 ms. The segmenter must first hear
  ``hangover_ms`` without cry to know an expiration has ended, so that wait is part of the figure;
- CPU of the daemon process while the input is silent (last ``--silence-s`` seconds); goal <= 3 % of a core;
- CPU while crying (share of one core over the cry bouts) and the daemon's own real-time factor
  (processing seconds per audio second, from its stats topic);
- peak RSS of the daemon (VmHWM); goal <= 300 MB;
- reference measured in the same run: the embedder alone on a 1 s clip (ms), to compare machines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import psutil
import soundfile as sf
from paho.mqtt.enums import CallbackAPIVersion

from _common import DATA_DIR, Broker, free_port
from cryid.daemon import nursery
from cryid.daemon.config import Settings
from cryid.models.audio import SAMPLE_RATE, load_audio


def _stream(data: Path, n_files: int, silence_s: float) -> tuple[np.ndarray, list[tuple[float, float]]]:
    import csv

    rng = np.random.default_rng(0)
    with open(data / "metadata.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "dev"][:n_files]
    parts = [nursery.room_noise(4.0, rng)]
    bouts = []
    pos = parts[0].size
    for r in rows:
        wav = load_audio(data / r["file_name"])
        bouts.append((pos / SAMPLE_RATE, (pos + wav.size) / SAMPLE_RATE))
        gap = nursery.room_noise(8.0, rng)
        parts += [wav, gap]
        pos += wav.size + gap.size
    parts.append(nursery.room_noise(silence_s, rng))
    return np.concatenate(parts), bouts


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def _embedder_reference(model: Path) -> float:
    from cryid.models.embedder import Embedder

    emb = Embedder(model)
    clip = nursery.expiration(nursery.voices(1)[0], 1.0, np.random.default_rng(0))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        emb.embed(clip)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Settings().model)
    ap.add_argument("--data", type=Path, default=DATA_DIR)
    ap.add_argument("--files", type=int, default=6)
    ap.add_argument("--silence-s", type=float, default=30.0)
    args = ap.parse_args()
    if not (args.model / "model.onnx").is_file():
        sys.exit(f"bench: no model at {args.model}; give --model DIR")
    if not (args.data / "metadata.csv").is_file():
        sys.exit(f"bench: no real cries at {args.data}; give --data DIR")

    wav, bouts = _stream(args.data, args.files, args.silence_s)
    work = Path(tempfile.mkdtemp(prefix="cryid-bench-"))
    stream = work / "stream.wav"
    sf.write(stream, wav, SAMPLE_RATE)
    duration = wav.size / SAMPLE_RATE
    print(
        f"stream: {duration:.1f} s ({len(bouts)} real recordings + {args.silence_s:.0f} s silence at the end)"
    )
    ref_ms = _embedder_reference(args.model)
    print(f"reference: embedder alone on a 1 s clip: {ref_ms:.1f} ms (median of 5)")

    if shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists():
        (work / "broker").mkdir()
        broker = Broker(work / "broker")
        broker.start()
        host, port, stop_broker = broker.host, broker.port, broker.stop
    else:
        from cryid.daemon.demo import EmbeddedBroker

        port = free_port()
        eb = EmbeddedBroker(port)
        eb.start()
        host, stop_broker = "127.0.0.1", eb.stop

    arrivals: list[tuple[float, dict]] = []
    stats: list[dict] = []
    lock = threading.Lock()

    def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        if msg.topic.endswith("/stats"):
            stats.append(json.loads(msg.payload))
        elif ("/baby/" in msg.topic and not msg.topic.endswith("/state")) or msg.topic.endswith("/unknown"):
            with lock:
                arrivals.append((now, json.loads(msg.payload)))

    sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-sub")
    sub.on_message = on_message
    sub.connect(host, port)
    sub.subscribe("cryid/#", qos=1)
    sub.loop_start()

    env = {k: v for k, v in os.environ.items() if not k.startswith("CRYID_")}
    env.update(
        CRYID_STATE_DIR=str(work / "state"),
        CRYID_MODEL=str(args.model),
        CRYID_MQTT__HOST=host,
        CRYID_MQTT__PORT=str(port),
        CRYID_MQTT__STATS_INTERVAL_S="2",
    )
    cmd = [sys.executable, "-m", "cryid.daemon.cli", "run", "--source", str(stream), "--realtime"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    # the stream clock starts when the daemon has loaded the model; find it from the first stats
    samples: list[tuple[float, float]] = []
    hwm = 0
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
    err = proc.stderr.read() if proc.stderr else ""
    sub.loop_stop()
    stop_broker()
    if proc.returncode != 0:
        print(err)
        sys.exit(f"bench: cryid run exited {proc.returncode}")

    lat = []
    for recv, ev in arrivals:
        if ev["kind"] == "expiration":
            lat.append(
                (recv - datetime.fromisoformat(ev["ended_at"].replace("Z", "+00:00")).timestamp()) * 1000
            )
    lat_a = np.array(lat)
    first_start = min(
        datetime.fromisoformat(ev["started_at"].replace("Z", "+00:00")).timestamp() - ev["stream_offset_s"]
        for _, ev in arrivals
    )

    def cpu_between(t0: float, t1: float) -> float:
        pts = [(t, c) for t, c in samples if t0 <= t <= t1]
        if len(pts) < 2:
            return float("nan")
        return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])

    silent_from = first_start + duration - args.silence_s + 2.0
    idle = cpu_between(silent_from, first_start + duration - 0.5)
    crying = [cpu_between(first_start + a, first_start + b + 0.3) for a, b in bouts]
    rtfs = [s["realtime_factor"] for s in stats if s.get("realtime_factor") is not None]
    print(f"events: {len(arrivals)} ({len(lat)} expirations)")
    if lat:
        p50, p95 = np.percentile(lat_a, 50), np.percentile(lat_a, 95)
        print(
            f"latency end of expiration -> PUBLISH: p50 {p50:.0f} ms, p95 {p95:.0f} ms, "
            f"max {lat_a.max():.0f} ms (goal p95 <= 150 ms: {'met' if p95 <= 150 else 'NOT met'}; "
            f"p95 = {p95 / ref_ms:.1f}x the 1 s embedding)"
        )
    print(
        f"CPU while silent: {idle * 100:.2f} % of one core "
        f"(goal <= 3 %: {'met' if idle <= 0.03 else 'NOT met'})"
    )
    print(
        f"CPU while crying: mean {np.nanmean(crying) * 100:.1f} %, "
        f"max {np.nanmax(crying) * 100:.1f} % of one core"
    )
    if rtfs:
        print(f"real-time factor (daemon stats, 2 s windows): max {max(rtfs):.3f}, mean {np.mean(rtfs):.3f}")
    print(f"peak RSS: {hwm / 1024:.0f} MB (goal <= 300 MB: {'met' if hwm / 1024 <= 300 else 'NOT met'})")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
