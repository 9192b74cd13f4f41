"""The registry deleted or replaced under a running daemon (issue 15, item 6): the daemon notices the
new file (another inode, or none), reopens it, reloads the babies and says so in its log.

A real daemon (``cryid -v run --source -``, stdin held open), a real mosquitto, real cries and the
shipped model; the registry is removed with its -wal and -shm, like ``rm registry.sqlite3*``.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cryid.models.config import DEFAULT_MODEL_DIR
from tests.fixtures.cli import cryid_env
from tests.fixtures.data import dac_rows

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`


def _cries(dac_dir: Path, baby_id: str) -> list[str]:
    return [
        str(dac_dir / r["file_name"]) for r in dac_rows(split="dev", period="B") if r["baby_id"] == baby_id
    ]


class _Lines:
    """The daemon's stderr, line by line, readable with a deadline."""

    def __init__(self, stream: object) -> None:
        self.q: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.q.put(line)

    def wait_for(self, *needles: str, timeout_s: float = 30.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.q.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(line)
            if all(n in line for n in needles):
                return line
        raise AssertionError(f"no log line with {needles} in {timeout_s} s:\n" + "".join(self.seen[-30:]))


def test_registry_deleted_and_recreated_under_a_running_daemon(
    tmp_path: Path, dac_dir: Path, mosquitto: object
) -> None:
    state = tmp_path / "state"
    env = cryid_env()
    env.update(
        CRYID_STATE_DIR=str(state),
        CRYID_MODEL=str(DEFAULT_MODEL_DIR),
        CRYID_MQTT__HOST=mosquitto.host,  # type: ignore[attr-defined]
        CRYID_MQTT__PORT=str(mosquitto.port),  # type: ignore[attr-defined]
        CRYID_SERVICE__SHUTDOWN_TIMEOUT_S="5",
    )
    cli = [sys.executable, "-m", "cryid.daemon.cli"]

    def enroll(baby: str) -> None:
        done = subprocess.run(
            [*cli, "enroll", "add", baby, *_cries(dac_dir, baby)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr

    enroll("dac0018")
    enroll("dac0059")
    daemon = subprocess.Popen(
        [*cli, "-v", "run", "--source", "-"],
        env=env,
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        log = _Lines(daemon.stderr)
        log.wait_for("registry: 2 babies enrolled")
        for p in state.iterdir():
            if p.name.startswith("registry.sqlite3"):
                p.unlink()  # rm registry.sqlite3*
        enroll("dac0084")  # a new enrollment, in a new file
        line = log.wait_for("registry: 1 baby enrolled")  # not the two babies of the deleted file
        assert "added dac0084" in line, line
        assert any("while open; reopened it" in seen for seen in log.seen), "".join(log.seen[-30:])
        assert daemon.stdin is not None
        daemon.stdin.close()  # end of the stream: the daemon stops
        assert daemon.wait(timeout=60) == 0, "".join(log.seen[-30:])
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(timeout=10)


def test_registry_replaced_by_another_file_is_reloaded(tmp_path: Path, dac_dir: Path) -> None:
    """``mv new.sqlite3 registry.sqlite3`` (another inode): the registry reopens and sees the new babies."""
    import shutil

    from cryid.daemon.cli import main
    from cryid.enrollment.registry import Registry

    state, other = tmp_path / "state", tmp_path / "other"
    mp_env = {"CRYID_MODEL": str(DEFAULT_MODEL_DIR)}
    os.environ.update(mp_env)
    try:
        os.environ["CRYID_STATE_DIR"] = str(other)
        assert main(["enroll", "add", "dac0059", *_cries(dac_dir, "dac0059")]) == 0
        os.environ["CRYID_STATE_DIR"] = str(state)
        assert main(["enroll", "add", "dac0018", *_cries(dac_dir, "dac0018")]) == 0
    finally:
        for k in ("CRYID_MODEL", "CRYID_STATE_DIR"):
            os.environ.pop(k, None)
    with Registry.open(state) as reg:
        assert [i.baby_id for i in reg.infants()] == ["dac0018"]
        assert reg.reopen_if_replaced() is False
        before = reg.data_version()
        shutil.copy(other / "registry.sqlite3", state / "registry.sqlite3.new")
        os.replace(state / "registry.sqlite3.new", state / "registry.sqlite3")
        assert reg.reopen_if_replaced() is True
        assert reg.data_version() != before
        assert [i.baby_id for i in reg.infants()] == ["dac0059"]
