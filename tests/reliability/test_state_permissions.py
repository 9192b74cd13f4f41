"""Permissions of what identifies newborns (issue 15, item 12): the state directory is created 0700 and
the registry, the outbox and exports 0600 by the CLI too, whatever the umask (here the usual 022).
"""

from __future__ import annotations

import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cryid.models.config import DEFAULT_MODEL_DIR
from tests.fixtures.cli import cryid_env
from tests.fixtures.data import dac_rows

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _as_user_with_umask_022(state: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = cryid_env()
    env.update(CRYID_STATE_DIR=str(state), CRYID_MODEL=str(DEFAULT_MODEL_DIR))
    cmd = "umask 022; exec " + " ".join(shlex.quote(a) for a in argv)
    return subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=300)


def test_cli_creates_state_dir_0700_and_registry_and_export_0600(tmp_path: Path, dac_dir: Path) -> None:
    state = tmp_path / "ward" / "state"
    cries = [
        str(dac_dir / r["file_name"]) for r in dac_rows(split="dev", period="B") if r["baby_id"] == "dac0059"
    ]
    cli = [sys.executable, "-m", "cryid.daemon.cli"]
    done = _as_user_with_umask_022(state, *cli, "enroll", "add", "dac0059", *cries)
    assert done.returncode == 0, done.stderr
    export = tmp_path / "ward.json"
    done = _as_user_with_umask_022(state, *cli, "enroll", "export", str(export))
    assert done.returncode == 0, done.stderr
    assert _mode(state) == 0o700
    files = [p for p in state.iterdir() if p.name.startswith("registry.sqlite3")]
    assert files and all(_mode(p) == 0o600 for p in files), {p.name: oct(_mode(p)) for p in files}
    assert _mode(export) == 0o600


def test_outbox_is_created_0600(tmp_path: Path) -> None:
    state = tmp_path / "state"
    code = (
        "from pathlib import Path; from cryid.daemon.outbox import Outbox; "
        f"ob = Outbox.open(Path({str(state)!r})); ob.add('e1', 'episode', 't', '{{}}'); ob.close()"
    )
    done = _as_user_with_umask_022(state, sys.executable, "-c", code)
    assert done.returncode == 0, done.stderr
    assert _mode(state) == 0o700
    files = [p for p in state.iterdir() if p.name.startswith("outbox.sqlite3")]
    assert files and all(_mode(p) == 0o600 for p in files), {p.name: oct(_mode(p)) for p in files}
