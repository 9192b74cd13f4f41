"""A full disk under the outbox (issue 15, item 5): keep listening, keep the newest events, recover.

The disk is a real 1 MiB tmpfs mounted for the test (``mount -t tmpfs``, needs root and
CAP_SYS_ADMIN), filled with a file, emptied by deleting it. Where mounting is not allowed, the outbox
test gets the same SQLite error (SQLITE_FULL, "database or disk is full") from SQLite itself through
``PRAGMA max_page_count`` and the daemon test is skipped; the output says which.
"""

from __future__ import annotations

import errno
import json
import logging
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cryid.daemon.config import MqttSettings, OutboxSettings, ServiceSettings, Settings
from cryid.daemon.outbox import Outbox
from cryid.daemon.service import build_service
from cryid.models.audio import load_audio
from tests.fixtures.broker import Broker, Subscriber
from tests.fixtures.data import dac_rows

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`

FAST_RETRY = OutboxSettings(disk_retry_s=0.05, memory_events=50)


class SmallDisk:
    """A directory whose file system can be filled up and emptied again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
                              capture_output=True, text=True)
        self.tmpfs = proc.returncode == 0
        self._filler = path / "filler"
        self._outboxes: list[Outbox] = []

    def fill(self, outbox: Outbox) -> None:
        """No room left for the outbox's next write."""
        if self.tmpfs:
            try:
                with open(self._filler, "ab", buffering=0) as fh:
                    while True:
                        fh.write(b"\0" * 1024)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
        else:  # SQLite's own limit: the next page the outbox needs fails with SQLITE_FULL
            pages = outbox._db.execute("PRAGMA page_count").fetchone()[0]
            outbox._db.execute(f"PRAGMA max_page_count = {pages}")

    def free(self, outbox: Outbox) -> None:
        if self.tmpfs:
            self._filler.unlink()
        else:
            outbox._db.execute("PRAGMA max_page_count = 1073741823")

    def close(self) -> None:
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture()
def small_disk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[SmallDisk]:
    disk = SmallDisk(tmp_path / "disk")
    with capsys.disabled():
        print(f"\n[disk full] {'a 1 MiB tmpfs' if disk.tmpfs else 'SQLite max_page_count (no mount here)'}")
    yield disk
    disk.close()


def _add(outbox: Outbox, n: int, kind: str = "episode") -> list[str]:
    ids = []
    for i in range(n):
        eid = str(uuid.uuid4())
        outbox.add(eid, kind, f"cryid/ward1/baby/b{i}", json.dumps({"event_id": eid, "pad": "x" * 800}))
        ids.append(eid)
    return ids


def test_the_outbox_keeps_the_newest_events_in_memory_and_recovers(
    small_disk: SmallDisk, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cryid.daemon.outbox")
    state = small_disk.path / "state"
    with Outbox.open(state, FAST_RETRY) as outbox:
        before = _add(outbox, 5)
        small_disk.fill(outbox)
        during = _add(outbox, 80)  # never raises; over memory_events (50) the oldest are dropped
        assert outbox.disk_full
        ids = outbox.event_ids()
        assert ids[: len(before)] == before
        assert ids[-50:] == during[-50:], "the newest events must be kept"
        assert outbox.memory_size >= 50
        assert outbox.size() == len(ids)
        # Held events are published and acknowledged like stored ones.
        assert during[-1] in {it.event_id for it in outbox.pending(limit=1000)}
        assert outbox.remove(during[-1]) and outbox.remove(before[0])
        full = [r for r in caplog.records if r.levelno >= logging.WARNING and "disk full" in r.getMessage()]
        assert len(full) == 1 and full[0].exc_info is None, [r.getMessage() for r in full]
        assert not outbox.retry()
        small_disk.free(outbox)
        time.sleep(0.1)  # disk_retry_s
        assert outbox.retry()
        assert not outbox.disk_full and outbox.memory_size == 0
        assert "disk space is back" in caplog.text
        kept = outbox.event_ids()
        after = _add(outbox, 3)
    with Outbox.open(state, FAST_RETRY) as outbox:  # what was held in memory is on disk now
        assert outbox.event_ids() == kept + after
        assert before[0] not in kept and during[-1] not in kept
        assert outbox.dropped == len(before) + len(during) - len(kept) - 2  # 2 acknowledged


@pytest.fixture(scope="module")
def crying(dac_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About a minute of real crying as one WAV file."""
    wav = np.concatenate([load_audio(dac_dir / r["file_name"]) for r in dac_rows(split="dev")[:9]])
    path = tmp_path_factory.mktemp("crying") / "crying.wav"
    sf.write(path, wav, 16000)
    return path


def test_the_daemon_keeps_listening_on_a_full_disk(
    small_disk: SmallDisk,
    crying: Path,
    mosquitto: Broker,
    subscriber_factory: Callable[..., Subscriber],
    caplog: pytest.LogCaptureFixture,
) -> None:
    if not small_disk.tmpfs:  # page limits are lifted again by the deletes that follow each PUBACK
        pytest.skip("needs a real small file system, and mount -t tmpfs is not permitted here")
    caplog.set_level(logging.INFO)
    sub = subscriber_factory(mosquitto, "cryid/#")
    settings = Settings(
        room="ward1",
        state_dir=small_disk.path / "state",
        mqtt=MqttSettings(host=mosquitto.host, port=mosquitto.port, reconnect_min_s=0.2),
        outbox=FAST_RETRY,
        service=ServiceSettings(shutdown_timeout_s=20.0),
    )
    service = build_service(settings, str(crying))
    try:
        small_disk.fill(service.outbox)
        result: list[int] = []
        runner = threading.Thread(target=lambda: result.append(service.run()))
        runner.start()
        runner.join(120)
        assert result == [0], f"the daemon stopped: {service.fatal}"
        stats = service.stats()
    finally:
        service.close()
    assert stats.disk_full is True
    assert service.counters.events >= 5, "the comparison needs events"
    sub.wait_for(lambda m: len(sub.events()) >= service.counters.events)
    assert len(sub.events()) == service.counters.events, "every event arrived although none was stored"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("disk full" in m for m in messages) == 1
    assert not any("pipeline failed" in m or "cannot rollback" in m for m in messages)
