"""Settings refuse values a ward cannot mean, with a one-line error naming the setting (``cryid config
check`` as a user runs it, environment and TOML)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cli import cryid_env

CRYID = [sys.executable, "-m", "cryid.daemon.cli"]


def _check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = cryid_env()
    clean |= {"CRYID_STATE_DIR": str(tmp_path / "state"), **env}
    return subprocess.run([*CRYID, "config", "check"], env=clean, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("value", "why"),
    [("0", "greater than 0"), ("-5", "greater than 0"), ("3601", "less than or equal to 3600")],
)
def test_max_episode_s_out_of_bounds_is_a_one_line_error(tmp_path: Path, value: str, why: str) -> None:
    """An episode must end some time (no 0 or negative length) and within an hour (a final event for
    every episode, and an episode's expirations held in memory, at most an hour's worth)."""
    done = _check(tmp_path, CRYID_IDENTIFIER__MAX_EPISODE_S=value)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cryid: error: invalid configuration:"), done.stderr
    assert "identifier.max_episode_s" in lines[0] and why in lines[0]


def test_max_episode_s_bounds_hold_in_the_config_file_too(tmp_path: Path) -> None:
    toml = tmp_path / "cryid.toml"
    toml.write_text("[identifier]\nmax_episode_s = 0.0\n")
    done = _check(tmp_path, CRYID_CONFIG=str(toml))
    assert done.returncode == 2 and "identifier.max_episode_s" in done.stderr


@pytest.mark.parametrize("value", ["0.5", "120", "3600"])
def test_max_episode_s_within_bounds_is_accepted(tmp_path: Path, value: str) -> None:
    done = _check(tmp_path, CRYID_IDENTIFIER__MAX_EPISODE_S=value)
    assert done.returncode == 0, done.stderr
    assert f"max_episode_s = {float(value)!r}" in done.stdout
