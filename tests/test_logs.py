"""Logs a person can use: one start line at the default level, problems as warnings naming their
cause, and ``--log-format json`` (one JSON object a line) for journald / ELK. Real ``cryid run``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cryid.daemon import nursery
from tests.fixtures.broker import Broker, free_port
from tests.fixtures.cli import cryid_env
from tests.test_metrics_http import enroll_state, model_dir

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`

CRYID = [sys.executable, "-m", "cryid.daemon.cli"]


def _quiet_file(tmp_path: Path) -> Path:
    path = tmp_path / "quiet.wav"
    sf.write(path, nursery.room_noise(2.0, np.random.default_rng(0)), 16000)
    return path


def _env(state: Path, model: Path, port: int) -> dict[str, str]:
    env = cryid_env()
    return env | {
        "CRYID_ROOM": "ward3",
        "CRYID_STATE_DIR": str(state),
        "CRYID_MODEL": str(model),
        "CRYID_MQTT__HOST": "127.0.0.1",
        "CRYID_MQTT__PORT": str(port),
        "CRYID_SERVICE__SHUTDOWN_TIMEOUT_S": "4",
    }


def test_default_level_prints_one_start_line(
    request: pytest.FixtureRequest, mosquitto: Broker, tmp_path: Path
) -> None:
    model = model_dir(request)
    state = tmp_path / "state"
    enroll_state(state, model, ["ada", "ben"], room="ward3")
    quiet = _quiet_file(tmp_path)
    res = subprocess.run([*CRYID, "run", "--source", str(quiet)], env=_env(state, model, mosquitto.port),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr  # nothing else when all is well
    line = lines[0]
    assert (
        f"cryid run: room ward3, model {model.name} (" in line
        and "2 babies enrolled" in line
        and f"source {quiet}" in line
        and f"broker 127.0.0.1:{mosquitto.port}" in line
    ), line


def test_unreachable_broker_and_no_babies_are_warnings_naming_the_cause(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens there
    res = subprocess.run([*CRYID, "run", "--source", str(_quiet_file(tmp_path))],
                         env=_env(tmp_path / "state", model_dir(request), port),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    err = res.stderr
    assert "0 babies enrolled" in err
    assert "WARNING cryid.daemon.integrations: no babies enrolled for model" in err
    assert "every cry is published as unknown; enroll with `cryid enroll add" in err
    assert f"WARNING cryid.daemon.mqtt: broker 127.0.0.1:{port} unreachable" in err
    assert "unreachable (nothing accepts connections there, or the network is down" in err
    assert "), retrying in 3 s" in err
    assert "Connection failed, retrying" not in err and " ERROR " not in err  # no bare paho lines
    assert [x for x in err.splitlines() if " INFO " in x] == [err.splitlines()[0]]  # only the start line


def test_json_log_format(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    port = free_port()
    res = subprocess.run([*CRYID, "--log-format", "json", "run", "--source", str(_quiet_file(tmp_path))],
                         env=_env(tmp_path / "state", model_dir(request), port),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in res.stderr.splitlines()]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message", "thread"} <= set(r) for r in records)
    assert all(r["ts"].endswith("+00:00") for r in records)
    start = [r for r in records if r["logger"] == "cryid.start"]
    assert len(start) == 1 and start[0]["level"] == "info" and "room ward3" in start[0]["message"]
    unreachable = [r for r in records if "unreachable" in r["message"]]
    assert unreachable and unreachable[0]["level"] == "warning"
    assert unreachable[0]["logger"] == "cryid.daemon.mqtt"
