"""Configuration holes of issue 15 (item 8): each is refused with one line, or warned about."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cli import cryid_env

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`


def _cryid(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = cryid_env()
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "cryid.daemon.cli", *args],
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cryid: error: "), done.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("prefix", ["cryid/#", "cryid/+/nursery", "ward+1"])
def test_topic_prefix_with_wildcards_is_refused(tmp_path: Path, prefix: str) -> None:
    done = _cryid(
        "config", "check", env={"CRYID_STATE_DIR": str(tmp_path), "CRYID_MQTT__TOPIC_PREFIX": prefix}
    )
    _one_line_error(done, "mqtt.topic_prefix", "wildcard")


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_cryid_config_naming_no_file_is_refused(tmp_path: Path, kind: str) -> None:
    named = tmp_path / "nope.toml" if kind == "missing" else tmp_path
    done = _cryid("config", "check", env={"CRYID_STATE_DIR": str(tmp_path), "CRYID_CONFIG": str(named)})
    _one_line_error(done, "CRYID_CONFIG", str(named))


def test_unknown_cryid_variable_is_warned_about_with_the_closest_name(tmp_path: Path) -> None:
    done = _cryid("config", "check", env={"CRYID_STATE_DIR": str(tmp_path), "CRYID_MQTT_HOST": "broker.ward"})
    assert done.returncode == 0, done.stderr
    assert "CRYID_MQTT_HOST" in done.stderr and "CRYID_MQTT__HOST" in done.stderr
    known = _cryid("config", "check", env={"CRYID_STATE_DIR": str(tmp_path), "CRYID_MQTT__HOST": "b"})
    assert "not a cryid setting" not in known.stderr  # valid names are not warned about


def test_empty_state_dir_is_refused(tmp_path: Path) -> None:
    done = _cryid("config", "check", env={"CRYID_STATE_DIR": ""})
    _one_line_error(done, "state_dir", "empty")


@pytest.mark.parametrize(
    ("var", "name"),
    [
        ("CRYID_REGISTRY__FILENAME", "../../etc/passwd"),
        ("CRYID_REGISTRY__FILENAME", "sub/registry.sqlite3"),
        ("CRYID_OUTBOX__FILENAME", ".."),
        ("CRYID_OUTBOX__FILENAME", "/tmp/outbox.sqlite3"),
    ],
)
def test_state_file_names_must_be_plain(tmp_path: Path, var: str, name: str) -> None:
    done = _cryid("config", "check", env={"CRYID_STATE_DIR": str(tmp_path), var: name})
    _one_line_error(done, var.split("_", 1)[1].split("__")[0].lower(), "plain file name")


def test_missing_model_fails_config_check(tmp_path: Path) -> None:
    done = _cryid("config", "check", env={"CRYID_STATE_DIR": str(tmp_path), "CRYID_MODEL": "/nonexistent"})
    _one_line_error(done, "/nonexistent", "cryid model export")
