"""`cryid demo` end to end: enrollment, nursery stream, the daemon's MQTT path, summary.

The demo runs as a user runs it: with the shipped model (models/default), which separates the
generated voices; the seeded random test model does not reliably.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.fixtures.broker import Broker, Subscriber, free_port


def _demo(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRYID_")}
    env.update(CRYID_MQTT__HOST="127.0.0.1", CRYID_MQTT__PORT=str(port))
    return subprocess.run(
        [sys.executable, "-m", "cryid.daemon.cli", "demo", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_demo_without_a_broker_starts_an_embedded_one() -> None:
    done = _demo(free_port(), "--synthetic")
    print(done.stdout)
    assert done.returncode == 0, done.stderr
    assert "started an embedded one" in done.stdout
    assert "4/4 crying episodes identified correctly" in done.stdout
    assert "EPISODE" in done.stdout and "unknown" in done.stdout


def test_demo_publishes_on_the_configured_broker(
    mosquitto: Broker, subscriber_factory: Callable[..., Subscriber], tmp_path: Path
) -> None:
    sub = subscriber_factory(mosquitto, "cryid/nursery/#")
    done = _demo(mosquitto.port, "--synthetic", "--babies", "2", "--keep", str(tmp_path / "demo"))
    assert done.returncode == 0, done.stderr
    assert f"using the MQTT broker at 127.0.0.1:{mosquitto.port}" in done.stdout
    assert "3/3 crying episodes identified correctly" in done.stdout
    episodes = [
        e for e in sub.wait_for(lambda m: len(sub.events()) >= 3) and sub.events() if e["kind"] == "episode"
    ]
    assert sorted(str(e["baby_id"]) for e in episodes) == ["None", "baby1", "baby2"]
    assert (tmp_path / "demo" / "registry.sqlite3").is_file()  # --keep keeps the state
