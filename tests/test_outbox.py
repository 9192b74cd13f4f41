"""The SQLite outbox: durable, ordered, bounded with a drop policy, exclusive per state directory."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cryid.daemon.config import OutboxSettings
from cryid.daemon.outbox import Outbox, OutboxError

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`


def test_add_pending_remove_in_order(tmp_path: Path) -> None:
    with Outbox.open(tmp_path) as ob:
        for i in range(5):
            ob.add(f"e{i}", "expiration", f"t/{i}", f'{{"i": {i}}}')
        assert ob.size() == 5
        assert [it.event_id for it in ob.pending(limit=3)] == ["e0", "e1", "e2"]
        assert [it.event_id for it in ob.pending(limit=3, exclude={"e0", "e2"})] == ["e1", "e3", "e4"]
        assert ob.remove("e1") is True
        assert ob.remove("e1") is False
        assert ob.size() == 4
        assert ob.event_ids() == ["e0", "e2", "e3", "e4"]
        item = ob.pending(limit=1)[0]
        assert (item.topic, item.payload, item.kind) == ("t/0", '{"i": 0}', "expiration")


def test_survives_a_killed_process(tmp_path: Path) -> None:
    """Rows committed by a process that is then SIGKILLed are there for the next one."""
    code = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from cryid.daemon.outbox import Outbox
        ob = Outbox.open(Path({str(tmp_path)!r}))
        for i in range(20):
            ob.add(f"k{{i}}", "episode", "t", "{{}}")
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    with Outbox.open(tmp_path) as ob:
        assert ob.event_ids() == [f"k{i}" for i in range(20)]


def test_bound_drops_provisional_before_final_and_counts(tmp_path: Path) -> None:
    settings = OutboxSettings(max_events=10)
    with Outbox.open(tmp_path, settings) as ob:
        for i in range(4):
            ob.add(f"ep{i}", "episode", "t", "{}")
        for i in range(6):
            ob.add(f"ex{i}", "expiration", "t", "{}")
        assert ob.dropped == 0
        assert ob.add("ep4", "episode", "t", "{}") == ["ex0"]
        assert ob.add("ep5", "episode", "t", "{}") == ["ex1"]
        assert ob.size() == 10
        assert ob.dropped == 2
        for i in range(6, 14):  # only episodes left to drop once the expirations are gone
            ob.add(f"ep{i}", "episode", "t", "{}")
        ids = ob.event_ids()
        assert len(ids) == 10
        assert not any(i.startswith("ex") for i in ids)
        assert ids == [f"ep{i}" for i in range(4, 14)]
        assert ob.dropped == 10
    with Outbox.open(tmp_path, settings) as ob:  # the drop counter is persistent
        assert ob.dropped == 10


def test_second_daemon_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    with Outbox.open(tmp_path), pytest.raises(OutboxError, match="in use by another cryid daemon"):
        Outbox.open(tmp_path)
    Outbox.open(tmp_path).close()  # released on close


def test_unwritable_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutboxError, match="CRYID_STATE_DIR"):
        Outbox.open(blocker / "state")


def test_a_state_dir_that_does_not_exist_yet_is_created(tmp_path: Path) -> None:
    """A fresh install: CRYID_STATE_DIR and its parents do not exist; the first start creates them and
    the events stored there are found again by the next start."""
    state = tmp_path / "var" / "lib" / "cryid"
    with Outbox.open(state) as ob:
        ob.add("e1", "episode", "t", "{}")
    assert (state / OutboxSettings().filename).is_file()
    with Outbox.open(state) as ob:
        assert ob.event_ids() == ["e1"] and ob.size() == 1
