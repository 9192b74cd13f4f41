"""Central broker sizing: how many cry events per second one mosquitto takes from many wards.

Run: ``.venv/bin/python bench/central_broker.py [--wards 1 10 50] [--events 4000] [--max-s 60]``.

A fresh mosquitto on a free port (no auth, no TLS: the broker's own work). Each ward is one
``mosquitto_pub -l -q 1`` connection (as a ward's bridge is one QoS 1 connection) publishing
``--events`` real CryEvent payloads (about 700 bytes) as fast as the broker acknowledges them; one
``mosquitto_sub -q 1`` consumer on ``cryid/#`` (a central dashboard or log shipper) receives them all.
Prints, per ward count: events received, wall seconds, events/s end to end, and the broker's own CPU
seconds (from /proc) with events per broker CPU-second: the figure to size by, since the publishers
and the consumer share this machine's cores with the broker. Bounded: every case stops after
``--max-s`` seconds (then the partial count is reported). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from cryid.daemon.events import CryEvent, RunnerUp

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def event_line(ward: int, i: int) -> str:
    now = datetime.now(timezone.utc)
    return CryEvent(
        event_id=str(uuid.uuid4()),
        episode_id=str(uuid.uuid4()),
        kind="expiration",
        decision="identified",
        baby_id=f"w{ward}-baby{i % 8}",
        best_baby_id=f"w{ward}-baby{i % 8}",
        score=0.81234,
        runner_up=RunnerUp(baby_id=f"w{ward}-baby{(i + 1) % 8}", score=0.51234),
        margin=0.3,
        started_at=now,
        ended_at=now,
        stream_offset_s=1234.5678,
        duration_s=0.84,
        n_expirations=3,
        level_dbfs=-23.4,
        model_sha256="0" * 64,
        room=f"ward{ward}",
    ).to_json()


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def wait_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"mosquitto did not listen on {port} within {timeout_s} s")


def run_case(workdir: Path, wards: int, events: int, max_s: float) -> dict[str, float]:
    port = free_port()
    conf = workdir / f"central-{wards}.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\n"
        "max_queued_messages 1000000\nmax_inflight_messages 100\nlog_type error\n"
    )
    broker = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_port(port)
        total = wards * events
        sub = subprocess.Popen(
            ["mosquitto_sub", "-p", str(port), "-q", "1", "-t", "cryid/#", "-C", str(total), "-i", "central"],
            stdout=subprocess.PIPE,
        )
        received = 0
        last = [0.0]

        def count() -> None:
            nonlocal received
            assert sub.stdout is not None
            for _ in sub.stdout:
                received += 1
                last[0] = time.monotonic()

        counter = threading.Thread(target=count, daemon=True)
        counter.start()
        time.sleep(0.5)  # the consumer's subscription is in place
        files = []
        for w in range(wards):
            f = workdir / f"ward{w}.jsonl"
            f.write_text("".join(event_line(w, i) + "\n" for i in range(events)))
            files.append(f)
        cpu0 = cpu_s(broker.pid)
        t0 = time.monotonic()
        pubs = [
            subprocess.Popen(
                [
                    "mosquitto_pub",
                    "-p",
                    str(port),
                    "-q",
                    "1",
                    "-l",
                    "-t",
                    f"cryid/ward{w}/unknown",
                    "-i",
                    f"w{w}",
                ],
                stdin=f.open("rb"),
            )
            for w, f in enumerate(files)
        ]
        deadline = t0 + max_s
        while sub.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        counter.join(timeout=2)
        cpu = cpu_s(broker.pid) - cpu0
        for p in [*pubs, sub]:
            if p.poll() is None:
                p.kill()
            p.wait()
        wall = (last[0] or time.monotonic()) - t0
        return {
            "wards": wards,
            "received": received,
            "sent": total,
            "wall_s": wall,
            "events_per_s": received / wall if wall > 0 else 0.0,
            "broker_cpu_s": cpu,
            "events_per_cpu_s": received / cpu if cpu > 0 else float("nan"),
        }
    finally:
        broker.terminate()
        broker.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wards", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--events", type=int, default=4000, help="events each ward publishes")
    ap.add_argument("--max-s", type=float, default=60.0, help="time limit of each case")
    args = ap.parse_args()
    print(f"mosquitto {subprocess.run([MOSQUITTO, '-h'], capture_output=True, text=True).stdout.split()[2]}, "
          f"{os.cpu_count()} CPUs, payload {len(event_line(0, 0))} bytes, QoS 1 in and out")  # fmt: skip
    print(f"{'wards':>5} {'received':>9} {'wall s':>7} {'events/s':>9} {'broker cpu':>10} {'ev/cpu-s':>9}")
    with tempfile.TemporaryDirectory() as d:
        for w in args.wards:
            r = run_case(Path(d), w, args.events, args.max_s)
            print(f"{w:>5} {r['received']:>9}/{r['sent']:<6} {r['wall_s']:>7.2f} {r['events_per_s']:>9.0f} "
                  f"{r['broker_cpu_s']:>10.2f} {r['events_per_cpu_s']:>9.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
