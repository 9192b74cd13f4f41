"""Outbox behaviour that mutation testing showed unchecked (bench/mutation.py daemon/outbox.py).

Real SQLite files; a full disk is the real 1 MiB tmpfs of tests/reliability/test_disk_full.py (SQLite's
own page limit where mounting is not allowed). Checked: what an operator reads (the one-line errors
and log lines), which events a full disk drops first, how often it retries, and what ``remove`` answers.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sqlite3
from pathlib import Path

import pytest

from cryid.daemon.config import OutboxSettings
from cryid.daemon.outbox import Outbox, OutboxError
from tests.reliability.test_disk_full import SmallDisk, small_disk  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow  # mounts a tmpfs: not in `pytest -m "not slow"`


def test_stored_events_cannot_be_changed_by_the_publisher(tmp_path: Path) -> None:
    with Outbox.open(tmp_path) as ob:
        ob.add("e1", "episode", "cryid/ward1/baby/ada", "{}")
        (item,) = ob.pending()
        with pytest.raises(dataclasses.FrozenInstanceError):
            item.payload = "{}"  # type: ignore[misc]


def test_another_programs_sqlite_file_is_refused_naming_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE invoices (n INTEGER)")
    db.commit()
    db.close()
    with pytest.raises(
        OutboxError, match=r"; it was left untouched: point outbox\.filename or CRYID_STATE_DIR elsewhere$"
    ):
        Outbox.open(tmp_path)
    assert sqlite3.connect(path).execute("SELECT name FROM sqlite_master").fetchall() == [("invoices",)]
    path.unlink()
    Outbox.open(tmp_path).close()  # the refusal released the lock


def test_an_outbox_that_cannot_be_opened_is_one_line_naming_the_outbox(tmp_path: Path) -> None:
    """A directory where the outbox file should be: not damage, so nothing is moved aside."""
    path = tmp_path / "outbox.sqlite3"
    path.mkdir()
    with pytest.raises(
        OutboxError, match=rf"^outbox {re.escape(str(path))}: unable to open database file; check"
    ):
        Outbox.open(tmp_path)
    assert path.is_dir() and not list(tmp_path.glob("*.corrupt-*"))


def test_a_damaged_outbox_is_moved_aside_and_the_log_says_how_to_recover_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "outbox.sqlite3").write_bytes(b"this is not a database, it is damage " * 200)
    caplog.set_level(logging.ERROR, logger="cryid.daemon.outbox")
    with Outbox.open(tmp_path) as ob:
        assert ob.size() == 0
    (aside,) = tmp_path.glob("outbox.sqlite3.corrupt-*")
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert re.fullmatch(
        rf"outbox {re.escape(str(tmp_path / 'outbox.sqlite3'))} is damaged \(.+\); moved it aside to "
        rf"{re.escape(str(aside))} and started a new one: the events it held were not published \(recover "
        rf"them with `sqlite3 {re.escape(str(aside))} \.recover` if needed\)",
        record.getMessage(),
    ), record.getMessage()


def test_a_full_disk_drops_provisional_events_first_and_says_so_once(
    small_disk: SmallDisk,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="cryid.daemon.outbox")
    settings = OutboxSettings(disk_retry_s=60.0, memory_events=10)  # the least allowed
    state = small_disk.path / "state"
    with Outbox.open(state, settings) as ob:
        ob.add("stored", "episode", "t", "{}")
        small_disk.fill(ob)
        assert ob.add("e1", "episode", "t", "{}") == []
        assert ob.disk_full
        assert ob.add("x1", "expiration", "t", "{}") == []
        for k in range(2, 10):
            assert ob.add(f"e{k}", "episode", "t", "{}") == []
        assert ob.memory_size == 10
        assert ob.add("e10", "episode", "t", "{}") == ["x1"]  # the provisional one, though e1 is older
        assert ob.event_ids() == ["stored"] + [f"e{k}" for k in range(1, 11)]
        assert ob.add("e11", "episode", "t", "{}") == ["e1"]  # nothing provisional left: the oldest
        assert ob.dropped == 2
        full = [r.getMessage() for r in caplog.records if r.getMessage().startswith("disk full: cannot")]
        assert len(full) == 1
        assert re.fullmatch(
            rf"disk full: cannot write the outbox {re.escape(str(ob.path))} \(.*full.*\); keeping the newest "
            rf"10 events in memory and retrying every 60 s; free space in {re.escape(str(ob.path.parent))}",
            full[0],
        ), full[0]
        # Space comes back, but the next try is a minute away: retry() does not write before that ...
        small_disk.free(ob)
        assert ob.retry() is False and ob.disk_full
        # ... a new event does, and takes the held ones with it.
        assert ob.add("e12", "episode", "t", "{}") == []
        assert not ob.disk_full and ob.memory_size == 0
        assert ob.event_ids() == ["stored"] + [f"e{k}" for k in range(2, 13)]


def test_an_event_acknowledged_on_a_full_disk_is_removed_once(small_disk: SmallDisk) -> None:  # noqa: F811
    """The broker acknowledges a stored event while the disk is full: ``remove`` says it was there; a
    second acknowledgement of it (paho re-sends after a reconnect) says it is gone; it never comes back."""
    state = small_disk.path / "state"
    settings = OutboxSettings(disk_retry_s=0.05)
    with Outbox.open(state, settings) as ob:
        ob.add("a", "episode", "t", "{}")
        ob.add("b", "episode", "t", "{}")
        small_disk.fill(ob)
        assert ob.remove("a") is True
        assert ob.remove("a") is False
        assert ob.event_ids() == ["b"] and ob.size() == 1
        assert [it.event_id for it in ob.pending()] == ["b"]
        small_disk.free(ob)
        ob.add("c", "episode", "t", "{}")
    with Outbox.open(state, settings) as ob:
        assert ob.event_ids() == ["b", "c"]


def test_sync_says_false_when_the_outbox_files_are_gone(tmp_path: Path) -> None:
    """``sync`` is True only when it fsynced a file: with the outbox's files removed behind its back
    (an operator clearing the state folder) there is nothing to sync, and it says so."""
    box = Outbox.open(tmp_path, OutboxSettings(fsync=True))
    try:
        box.add("e1", "expiration", "t", "{}")
        for name in ("outbox.sqlite3-wal", "outbox.sqlite3"):
            (tmp_path / name).unlink()
        assert box.sync() is False
        box.add("e2", "expiration", "t", "{}")
        assert box.sync() is False
    finally:
        box.close()
