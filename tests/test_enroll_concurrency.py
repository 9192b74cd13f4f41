"""Several processes on one registry: concurrent enrollments while a reader reads, and kill -9 mid-write.

Each enrollment is a real ``cryid enroll`` subprocess (real cries, real ONNX model, real SQLite).
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cryid.enrollment.config import RegistrySettings
from cryid.enrollment.registry import Registry
from cryid.models.manifest import load_manifest
from tests.crash_entry import CRASH_MESSAGE
from tests.fixtures.cli import cryid_env
from tests.fixtures.data import dac_rows

pytestmark = pytest.mark.slow
CRYID = [sys.executable, "-m", "cryid.daemon.cli"]
REPO = Path(__file__).resolve().parents[1]


def row_counts(reg: Registry) -> tuple[int, int]:
    return reg._query("SELECT (SELECT count(*) FROM samples), (SELECT count(*) FROM embeddings)")[0]


def files(dac_dir: Path, baby_id: str, period: str = "B") -> list[str]:
    rows = dac_rows(split="dev", period=period)
    return [str(dac_dir / r["file_name"]) for r in rows if r["baby_id"] == baby_id]


def env_for(state: Path, model: Path, **extra: str) -> dict[str, str]:
    env = cryid_env()
    env.update(CRYID_STATE_DIR=str(state), CRYID_MODEL=str(model), **extra)
    return env


def start(
    args: list[str], env: dict[str, str], log: Path, crash_at: str | None = None
) -> subprocess.Popen[bytes]:
    """``cryid -v ARGS`` in the background; with ``crash_at``, through tests/crash_entry.py."""
    cmd = [*CRYID, "-v", *args]
    if crash_at is not None:
        cmd = [sys.executable, "-m", "tests.crash_entry", crash_at, "-v", *args]
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)


def wait_for_line(log: Path, text: str, proc: subprocess.Popen[bytes], limit_s: float = 300.0) -> None:
    deadline = time.monotonic() + limit_s
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None:
            pytest.fail(f"process ended (rc {proc.returncode}) before logging {text!r}: {log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {text!r} in {log} after {limit_s} s")
        time.sleep(0.05)


class Reader(threading.Thread):
    """What the daemon does: poll data_version and reload centroids, on its own connection."""

    def __init__(self, state: Path, sha: str) -> None:
        super().__init__(daemon=True)
        self.reg = Registry.open(state, RegistrySettings())
        self.sha = sha
        self.stop = threading.Event()
        self.reads = 0
        self.versions: set[int] = set()
        self.errors: list[BaseException] = []
        self.last: dict[str, np.ndarray] = {}

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.versions.add(self.reg.data_version())
                cents = self.reg.centroids(self.sha)
                for c in cents.values():
                    if not np.isclose(np.linalg.norm(c), 1.0, atol=1e-5):
                        raise AssertionError("centroid is not a unit vector")
                self.last = cents
                self.reads += 1
                time.sleep(0.01)
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)
        finally:
            self.reg.close()


def test_two_enrollments_at_once_while_reading(
    tmp_path: Path, shipped_model_dir: Path, dac_dir: Path
) -> None:
    state = tmp_path / "state"
    sha = load_manifest(shipped_model_dir).onnx_sha256
    Registry.open(state, RegistrySettings()).close()
    env = env_for(state, shipped_model_dir, CRYID_REGISTRY__BUSY_TIMEOUT_MS="300000")
    reader = Reader(state, sha)
    reader.start()
    # Hold the write lock so that both enrollments reach their write and then contend for it.
    blocker = sqlite3.connect(state / "registry.sqlite3", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    procs = {
        baby: start(["enroll", "add", baby, *files(dac_dir, baby)], env, tmp_path / f"{baby}.log")
        for baby in ("dac0018", "dac0059")
    }
    for baby, proc in procs.items():
        wait_for_line(tmp_path / f"{baby}.log", f"writing {baby}", proc)
    reads_before = reader.reads
    time.sleep(0.5)
    assert reader.reads > reads_before  # readers are not blocked by a held write lock (WAL)
    blocker.execute("COMMIT")
    blocker.close()
    for baby, proc in procs.items():
        assert proc.wait(timeout=300) == 0, (tmp_path / f"{baby}.log").read_text()
    time.sleep(0.2)
    reader.stop.set()
    reader.join(timeout=30)
    assert not reader.errors, reader.errors
    assert set(reader.last) == {"dac0018", "dac0059"}  # the reader saw both, without reopening
    assert len(reader.versions) >= 2
    with Registry.open(state, RegistrySettings()) as reg:
        assert reg.integrity_check() == "ok"
        assert [i.baby_id for i in reg.infants()] == ["dac0018", "dac0059"]
        for baby in ("dac0018", "dac0059"):
            assert len(reg.samples(baby)) == len(files(dac_dir, baby))


@pytest.mark.parametrize("point", ["after-sample", "before-commit"])
def test_kill_9_inside_enrollment_leaves_all_or_nothing(
    tmp_path: Path, shipped_model_dir: Path, dac_dir: Path, point: str
) -> None:
    state = tmp_path / "state"
    sha = load_manifest(shipped_model_dir).onnx_sha256
    env = env_for(state, shipped_model_dir)
    ok = subprocess.run(
        [*CRYID, "enroll", "add", "dac0059", *files(dac_dir, "dac0059")],
        env=env, capture_output=True, text=True,
    )
    assert ok.returncode == 0, ok.stderr
    with Registry.open(state, RegistrySettings()) as reg:
        before_centroids = reg.centroids(sha)
        before_rows = row_counts(reg)

    # Two files, so "after-sample" dies with one sample written and one still to come.
    crash = start(
        ["enroll", "add", "dac0018", *files(dac_dir, "dac0018")[:2]],
        env,
        tmp_path / "crash.log",
        crash_at=point,
    )
    assert crash.wait(timeout=300) == -signal.SIGKILL, (tmp_path / "crash.log").read_text()
    assert CRASH_MESSAGE.format(point=point) in (tmp_path / "crash.log").read_text()

    with Registry.open(state, RegistrySettings()) as reg:
        assert reg.integrity_check() == "ok"
        assert reg.get_infant("dac0018") is None  # not there at all ...
        assert row_counts(reg) == before_rows  # ... not even an orphan sample or embedding
        after = reg.centroids(sha)
        assert set(after) == set(before_centroids)
        np.testing.assert_array_equal(after["dac0059"], before_centroids["dac0059"])

    # the same enrollment, uninterrupted, then goes through: the registry is fully usable
    again = subprocess.run(
        [*CRYID, "enroll", "add", "dac0018", *files(dac_dir, "dac0018")[:2]],
        env=env, capture_output=True, text=True,
    )
    assert again.returncode == 0, again.stderr
    with Registry.open(state, RegistrySettings()) as reg:
        assert set(reg.centroids(sha)) == {"dac0018", "dac0059"}
        assert len(reg.samples("dac0018")) == 2
