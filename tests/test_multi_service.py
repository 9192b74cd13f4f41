"""Several rooms in one daemon get what the single-room daemon has (issues 16 and 18 together): stage stamps
and ``stats.stages`` per room, quiet blocks, an event-driven main loop, ``/metrics`` and ``/healthz`` for
every room, Home Assistant's birth message reaching every room, the daemon's last will, SIGHUP.

Real parts: ``build_multi_service`` (or ``cryid run --config`` as a subprocess) on ``[[sources]]`` file
sources played at real speed, the shipped ONNX model, a real mosquitto, real SQLite, generated cries and
room noise (``cryid.daemon.nursery``). Thread wake-ups are read from ``/proc/self/task/<tid>/status``.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from prometheus_client.parser import text_string_to_metric_families

from cryid.daemon import nursery
from cryid.daemon.config import MqttSettings, ServiceSettings, Settings
from cryid.daemon.homeassistant import HomeAssistantSettings
from cryid.daemon.metrics import MetricsSettings
from cryid.daemon.multi import MultiService, build_multi_service
from cryid.daemon.sourcelist import SourceEntry
from cryid.daemon.stages import STEPS
from cryid.enrollment.registry import Registry
from cryid.models.audio import SAMPLE_RATE
from cryid.models.embedder import Embedder
from tests.fixtures.broker import Broker, Subscriber, free_port
from tests.fixtures.cli import cryid_env
from tests.fixtures.logtail import LogTail

pytestmark = pytest.mark.slow  # starts mosquitto and the daemon: not in `pytest -m "not slow"`

SR = SAMPLE_RATE
CRYID = [sys.executable, "-m", "cryid.daemon.cli"]


def _cries(path: Path, seed: int, voice: int) -> Path:
    """One bout of a generated baby's cries between room noise (about 8 s)."""
    v = nursery.voices(3, seed=1)[voice]
    wav, _truth = nursery.nursery_stream([(None, nursery.bout(v, 3.0, seed=seed))], gap_s=2.0, seed=seed)
    sf.write(path, wav, SR)
    return path


def _noise(path: Path, seconds: float, seed: int) -> Path:
    sf.write(path, nursery.room_noise(seconds, np.random.default_rng(seed)), SR)
    return path


def _enroll(state: Path, model: Path, rooms: dict[str, int]) -> None:
    """One generated baby per room (``room -> voice``), so every room has someone to compare with."""
    settings = Settings(state_dir=state, model=model)
    embedder = Embedder(model)
    voices = nursery.voices(3, seed=1)
    with Registry.open(state, settings.registry) as registry:
        for room, voice in rooms.items():
            cries = [nursery.bout(voices[voice], 6, seed=100 + voice)]
            nursery.enroll(registry, embedder, settings, f"baby-{room}", cries, room)


def _settings(state: Path, model: Path, broker: Broker, sources: list[SourceEntry], **kw: Any) -> Settings:
    return Settings(
        state_dir=state,
        model=model,
        sources=sources,
        mqtt=MqttSettings(
            host=broker.host, port=broker.port, reconnect_min_s=0.2, reconnect_max_s=1.0, stats_interval_s=1.0
        ),
        service=ServiceSettings(shutdown_timeout_s=10.0),
        **kw,
    )


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _wait(cond: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout_s} s")
        time.sleep(0.05)


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def test_two_rooms_stamp_their_events_and_serve_metrics_health_and_discovery_per_room(
    shipped_model_dir: Path,
    mosquitto: Broker,
    subscriber_factory: Callable[..., Subscriber],
    tmp_path: Path,
) -> None:
    """Room ``sa`` has one microphone, room ``sb`` two (the same cry, the second 10 dB quieter). Each room's
    stats carry the stage figures of its own expiration events; one ``/metrics`` holds both rooms (label
    ``room``) and each source (label ``source``); ``/healthz`` answers for both; Home Assistant's birth
    message makes both rooms republish their discovery configs, whose availability includes the daemon's
    last will topic; ``cryid/status`` is the daemon's, each room has its own ``status``."""
    state = tmp_path / "state"
    _enroll(state, shipped_model_dir, {"sa": 0, "sb": 1})
    a = _cries(tmp_path / "a.wav", seed=11, voice=0)
    b = _cries(tmp_path / "b.wav", seed=12, voice=1)
    far = tmp_path / "b-far.wav"
    sf.write(far, sf.read(b, dtype="float32")[0] * 10 ** (-10 / 20), SR)
    port = free_port()
    settings = _settings(
        state, shipped_model_dir, mosquitto,
        [SourceEntry(name="a1", room="sa", file=a), SourceEntry(name="b1", room="sb", file=b),
         SourceEntry(name="b2", room="sb", file=far)],
        metrics=MetricsSettings(port=port), homeassistant=HomeAssistantSettings(enabled=True),
    )  # fmt: skip
    sub = subscriber_factory(mosquitto, "#")
    service = build_multi_service(settings)
    assert isinstance(service, MultiService)
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(service.run()))
    runner.start()
    try:
        _wait(lambda: ("cryid/sb/status", b"online") in [(m.topic, m.payload) for m in sub.messages], "up")
        _wait(lambda: _get(f"http://127.0.0.1:{port}/healthz")[0] == 200, "healthy rooms", 20)
        text = _get(f"http://127.0.0.1:{port}/metrics")[1]
        got = _samples(text)
        info = {lab["room"] for name, lab, _v in got if name == "cryid_info"}
        assert info == {"sa", "sb"}, info
        ups = {(lab["room"], lab["source"]): v for name, lab, v in got if name == "cryid_source_up"}
        assert ups == {("sa", "a1"): 1.0, ("sb", "b1"): 1.0, ("sb", "b2"): 1.0}, ups
        assert {lab.get("room") for name, lab, _v in got if name == "cryid_mqtt_connected"} == {"sa", "sb"}
        # Home Assistant restarts: both rooms' configs again (paho keeps one callback per topic filter)
        before = len(sub.messages)
        sub.client.publish("homeassistant/status", "online", qos=1)
        def republished() -> set[str]:
            return {m.topic.split("/")[2] for m in list(sub.messages)[before:] if m.topic.endswith("/config")}

        _wait(lambda: republished() == {"cryid_sa", "cryid_sb"}, "configs of both rooms republished", 20)
    finally:
        runner.join(timeout=120)
        service.close()
    assert codes == [0]
    sub.wait_for(lambda ms: any(m.topic == "cryid/status" and m.payload == b"offline" for m in ms), 10)
    statuses = [(m.topic, m.payload) for m in sub.messages if m.topic.endswith("status")]
    for topic in ("cryid/status", "cryid/sa/status", "cryid/sb/status"):
        assert (topic, b"online") in statuses and (topic, b"offline") in statuses, (topic, statuses)
    cfg = next(m.json() for m in sub.messages if m.topic == "homeassistant/sensor/cryid_sb/level/config")
    assert cfg["availability"] == [{"topic": "cryid/sb/status"}, {"topic": "cryid/status"}]
    assert cfg["availability_mode"] == "all"
    # the roster files of the two rooms do not overwrite each other
    for room in ("sa", "sb"):
        kept = json.loads((state / "rooms" / room / "homeassistant.json").read_text())["topics"]
        assert kept and all(f"/cryid_{room}/" in t for t in kept), kept

    final = _samples(service.metrics.text().decode())
    for room, r in zip(("sa", "sb"), service.rooms, strict=True):
        events = [e for e in sub.events() if e["_topic"].startswith(f"cryid/{room}/")]
        n = sum(e["kind"] == "expiration" for e in events)
        assert n >= 2, (room, events)
        stats = [m.json() for m in sub.messages if m.topic == f"cryid/{room}/stats"][-1]
        stages = stats["stages"]
        assert list(stages) == [name for _a, _b, name in STEPS], (room, stages)
        assert all(fig["n"] == n for fig in stages.values()), (room, n, stages)
        for rec in r.plug.stages.records():
            parts = [rec[name] for _a, _b, name in STEPS[:6]]
            assert sum(parts) == pytest.approx(rec["end_to_publish"], abs=1e-9)
            assert 0.0 <= rec["heard_to_read"] <= 1.0, rec  # a real-time source: heard ~ when read
        count = [v for name, lab, v in final if name == "cryid_stage_seconds_count"
                 and lab == {"room": room, "step": "end_to_puback"}]  # fmt: skip
        assert count == [n], (room, count)
    # the far microphone's copies are one cry with the near one's: room sb's events name both levels
    sb = [e for e in sub.events() if e["_topic"].startswith("cryid/sb/") and e["kind"] == "expiration"]
    assert all("b1" in e["levels_dbfs"] for e in sb) and any("b2" in e["levels_dbfs"] for e in sb), sb


def _wakeups(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/status") as fh:
        return sum(int(line.split()[1]) for line in fh if line.startswith("voluntary_ctxt_switches"))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread wake-ups from /proc (Linux)")
def test_quiet_rooms_read_blocks_and_barely_wake_up(
    shipped_model_dir: Path, mosquitto: Broker, tmp_path: Path
) -> None:
    """Two rooms (one with two microphones) of quiet room noise: once every source's gate has been shut a
    second, the sources deliver ``source.quiet_chunk_ms`` blocks (so the readers and the pipelines wake up
    once a block), and the main loops sleep until a duty is due (before: every room's pipeline polled its
    queue twice a second, the daemon's loop five times a second, and the sources read 20 ms chunks).
    Readers and pipelines are counted by the chunks they handle: their context switches also count waits
    for the GIL, many when two sources deliver at the same moment on a loaded machine."""
    noise = [_noise(tmp_path / f"n{i}.wav", 40.0, seed=20 + i) for i in range(3)]
    settings = _settings(
        tmp_path / "state", shipped_model_dir, mosquitto,
        [SourceEntry(name="q1", room="qa", file=noise[0]), SourceEntry(name="q2", room="qb", file=noise[1]),
         SourceEntry(name="q3", room="qb", file=noise[2])],
    )  # fmt: skip
    service = build_multi_service(settings)
    reads: dict[str, list[tuple[float, int]]] = {}  # source -> (time, size) of every chunk delivered
    for room in service.rooms:
        for r in room.runners:
            read, got = r.source.read, reads.setdefault(r.name, [])

            def recording(timeout_s: float | None = None, read: Any = read, got: list[Any] = got) -> Any:
                chunk = read(timeout_s)
                if chunk is not None:
                    got.append((time.monotonic(), chunk.samples.size))
                return chunk

            r.source.read = recording
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(service.run()), name="multi-main")
    runner.start()
    try:
        _wait(lambda: all(r.counters.samples >= 8 * SR and r._quiet for r in service.rooms), "quiet", 40)
        names = ("multi-main", "cryid-room-qa", "cryid-room-qb")
        tids = {n: [t.native_id for t in threading.enumerate() if t.name == n] for n in names}
        assert all(len(ts) == 1 for ts in tids.values()), tids
        before = {n: [_wakeups(t) for t in ts] for n, ts in tids.items()}
        t0 = time.monotonic()
        time.sleep(4.0)
        t1 = time.monotonic()
        dt = t1 - t0
        per_s = {
            n: max((_wakeups(t) - b) / dt for t, b in zip(ts, before[n], strict=True))
            for n, ts in tids.items()
        }
    finally:
        service.request_stop()
        runner.join(timeout=60)
        service.close()
    assert codes == [0]
    chunks_s = {n: sum(t0 <= t < t1 for t, _n in got) / dt for n, got in reads.items()}
    print("wake-ups per second:", {n: round(v, 1) for n, v in per_s.items()},
          "chunks per second:", {n: round(v, 1) for n, v in chunks_s.items()})  # fmt: skip
    block = settings.source.quiet_chunk_ms * SR // 1000
    assert all(size >= block for got in reads.values() for t, size in got if t0 <= t < t1), reads
    assert all(v <= 1000 / settings.source.quiet_chunk_ms + 1 for v in chunks_s.values()), chunks_s
    assert per_s["multi-main"] < 1.0, per_s
    assert per_s["cryid-room-qa"] < 4.0 and per_s["cryid-room-qb"] < 4.0, per_s


def test_last_will_marks_the_daemon_offline_and_sighup_names_the_sources(
    shipped_model_dir: Path,
    mosquitto: Broker,
    subscriber_factory: Callable[..., Subscriber],
    tmp_path: Path,
) -> None:
    """``cryid run`` with two rooms: SIGHUP after a source was added warns once that ``sources`` needs a
    restart; killed (SIGKILL), the broker publishes the daemon's last will, ``<topic_prefix>/status``
    ``offline`` (retained), which every room's availability depends on."""
    noise = [_noise(tmp_path / f"n{i}.wav", 120.0, seed=30 + i) for i in range(3)]
    cfg = tmp_path / "cryid.toml"
    rooms = f'[[sources]]\nname = "w1"\nroom = "wa"\nfile = "{noise[0]}"\n\n' \
            f'[[sources]]\nname = "w2"\nroom = "wb"\nfile = "{noise[1]}"\n'  # fmt: skip
    cfg.write_text(rooms + '\n[mqtt]\ntopic_prefix = "ward7"\n')
    env = cryid_env() | {
        "CRYID_STATE_DIR": str(tmp_path / "state"), "CRYID_MODEL": str(shipped_model_dir),
        "CRYID_MQTT__HOST": mosquitto.host, "CRYID_MQTT__PORT": str(mosquitto.port),
    }  # fmt: skip
    sub = subscriber_factory(mosquitto, "ward7/#")
    proc = subprocess.Popen([*CRYID, "-v", "run", "--config", str(cfg)], env=env, stderr=subprocess.PIPE)
    log = LogTail(proc.stderr)  # type: ignore[arg-type]
    log.start()
    try:
        _wait(lambda: {(m.topic, m.payload) for m in sub.messages} >= {
            ("ward7/status", b"online"), ("ward7/wa/status", b"online"), ("ward7/wb/status", b"online")},
            "online statuses", 120)  # fmt: skip
        cfg.write_text(rooms + f'\n[[sources]]\nname = "w3"\nroom = "wb"\nfile = "{noise[2]}"\n'
                       '\n[mqtt]\ntopic_prefix = "ward7"\n[identifier]\nepisode_gap_s = 3.0\n')  # fmt: skip
        n = len(log.lines)
        proc.send_signal(signal.SIGHUP)
        log.wait_for("take effect after a restart", proc, after=n, limit_s=30)
        time.sleep(1.0)  # every room has taken the new identifier settings
        warned = [line for _t, line in log.lines[n:] if "take effect after a restart" in line]
        assert len(warned) == 1 and "sources" in warned[0], warned
        assert sum("SIGHUP: reloading" in line for _t, line in log.lines[n:]) == 1
        assert all(r.startswith("ward7/") for r in {m.topic for m in sub.messages})
        before = len(sub.messages)
        proc.kill()
        proc.wait(timeout=30)
        # the broker publishes the will when the dead process's connection closes
        sub.wait_for(lambda ms: ("ward7/status", b"offline") in [(m.topic, m.payload) for m in ms[before:]])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    from tests.test_homeassistant import retained

    kept = {m.topic: m.payload for m in retained(mosquitto, "ward7/status")}
    assert kept["ward7/status"] == b"offline", kept


class _Unplugged:
    """A microphone that was unplugged: every read fails (a MicSource reopens it, so it has ``reopen``).
    The one stand-in here: a real unplugged device needs audio hardware (tests/test_virtual_mic.py)."""

    name = "unplugged"
    eof = False

    def read(self, timeout_s: float | None = None) -> Any:
        time.sleep(0.05)
        raise OSError("device unplugged")

    def reopen(self, why: str) -> None:
        pass

    def close(self) -> None:
        pass


def test_systemd_hears_ready_once_every_room_started_a_status_per_room_and_the_watchdog(
    shipped_model_dir: Path, mosquitto: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under systemd (``Type=notify``, ``WatchdogSec=``), as the single-room daemon: ``READY=1`` once every
    room has started (here room ``sb`` takes 1.5 s to read its registry), a ``STATUS=`` line naming each
    room's state (``sb``'s microphone is unplugged), ``WATCHDOG=1`` and ``STOPPING=1``."""
    import tempfile

    from tests.test_virtual_mic import NotifySocket

    noise = [_noise(tmp_path / f"n{i}.wav", 60.0, seed=40 + i) for i in range(2)]
    settings = _settings(
        tmp_path / "state", shipped_model_dir, mosquitto,
        [SourceEntry(name="a1", room="sa", file=noise[0]), SourceEntry(name="b1", room="sb", file=noise[1])],
    )  # fmt: skip
    sock_dir = Path(tempfile.mkdtemp(prefix="sdn-"))  # a unix socket's path has at most 107 bytes
    notify = NotifySocket(sock_dir / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # WATCHDOG=1 every 0.5 s
    service = build_multi_service(settings)
    slow = service.rooms[1]
    poll = slow._poll_registry
    first: list[float] = []

    def slow_poll() -> None:
        if not first:
            first.append(time.monotonic())
            time.sleep(1.5)
        poll()

    slow._poll_registry = slow_poll  # type: ignore[method-assign]
    slow.runners[0].source.close()
    slow.runners[0].source = _Unplugged()
    received: list[tuple[float, str]] = []
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(service.run()))
    t0 = time.monotonic()
    runner.start()
    try:

        def seen() -> list[str]:
            while len(received) < len(notify.messages):
                received.append((time.monotonic(), notify.messages[len(received)]))
            return [m for _t, m in received]

        _wait(lambda: "READY=1" in seen(), "READY=1", 60)
        ready_at = next(t for t, m in received if m == "READY=1")
        assert ready_at - t0 >= 1.5, f"READY=1 after {ready_at - t0:.2f} s, before room sb had started"
        want = "connected, 2 rooms; sa: listening; sb: microphone down; outbox 0"
        try:
            _wait(lambda: f"STATUS={want}" in seen(), f"STATUS={want}", 30)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; got {[m for m in seen() if m.startswith('STATUS')]}") from None
        _wait(lambda: seen().count("WATCHDOG=1") >= 3, "three WATCHDOG=1", 10)
    finally:
        service.request_stop()
        runner.join(timeout=60)
        service.close()
        notify.close()
    messages = notify.messages
    assert codes and messages.count("READY=1") == 1, messages
    assert messages.index("READY=1") < messages.index(f"STATUS={want}") < messages.index("STOPPING=1")
    statuses = [m for m in messages if m.startswith("STATUS=")]
    assert all(a != b for a, b in itertools.pairwise(statuses)), statuses  # sent when it changes
    assert all("2 rooms; sa: " in m for m in statuses), statuses
