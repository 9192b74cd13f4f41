"""The real capture path: a cry played into a virtual microphone is identified by ``cryid run --source mic``.

Four babies enrolled from real cries in ../shared/data (donateacry-cc) when present, else from generated
ones (cryid.daemon.nursery); the cry played is one that was held back from the enrollment.

A private PulseAudio server (its own runtime folder and socket) holds a null sink ``virtmic``; its
monitor is the default source, so ALSA's ``pulse`` device (what sounddevice/PortAudio sees) records
exactly what ``paplay --device=virtmic`` plays. Nothing is mocked: PortAudio, sounddevice, the
segmenter, the ONNX embedder, the registry written by ``cryid enroll add`` and a real mosquitto.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cryid.daemon.config import IdentifierSettings
from tests.fixtures.broker import Broker, Subscriber
from tests.fixtures.cli import cryid_env
from tests.fixtures.data import DAC_DIR, dac_rows

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`

REPO = Path(__file__).resolve().parents[1]
CRYID = [sys.executable, "-m", "cryid.daemon.cli"]
ROOM = "virtmic-test"


# Real cries: four dev infants enrolled from their birth (B) recordings; the discharge (D) recording
# of the first, never enrolled, is played. The shipped model scores it (centroid against centroid) 0.70
# against its own baby and below -0.14 against the three others, so the decision under the daemon's
# default settings is not at chance and is asserted (not only the ranking). (dac0118 and dac0320, here
# before, have birth recordings without a pitched cry, which the segmenter no longer takes for one.)
REAL_BABIES = ["dac0126", "dac0084", "dac0136", "dac0256"]


def _real_babies(dac_dir: Path) -> tuple[list[tuple[str, list[Path]]], Path]:
    """(baby id, its B recordings) for REAL_BABIES, and the held-back D recording of the first."""
    rows = dac_rows(split="dev")
    babies = [(b, [dac_dir / r["file_name"] for r in rows if r["baby_id"] == b and r["period"] == "B"])
              for b in REAL_BABIES]  # fmt: skip
    played = [dac_dir / r["file_name"] for r in rows if r["baby_id"] == REAL_BABIES[0] and r["period"] == "D"]
    assert all(files for _, files in babies) and played, f"{REAL_BABIES} are not in {dac_dir}"
    return babies, played[0]


def _generated_babies(out: Path) -> tuple[list[tuple[str, list[Path]]], Path]:
    """Without ../shared/data: four generated voices (cryid.daemon.nursery), two enrollment bouts each,
    and a third bout of the first, never enrolled, to play."""
    import soundfile as sf

    from cryid.daemon.nursery import bout, voices

    out.mkdir()
    babies, held_back = [], []
    for i, voice in enumerate(voices(4, seed=7)):
        paths = []
        for seed in range(3):
            path = out / f"gen{i}-{seed}.wav"
            sf.write(path, bout(voice, 6.0, seed=100 * i + seed), 16000, subtype="PCM_16")
            paths.append(path)
        babies.append((f"gen{i}", paths[:2]))
        held_back.append(paths[2])
    return babies, held_back[0]


def _babies(tmp_path: Path) -> tuple[list[tuple[str, list[Path]]], Path]:
    if (DAC_DIR / "metadata.csv").is_file():
        return _real_babies(DAC_DIR)
    return _generated_babies(tmp_path / "generated")


def _wait(cond: Callable[[], bool], what: str, proc: subprocess.Popen[str], timeout_s: float) -> None:
    """Wait for ``cond`` while ``cryid run`` (``proc``) is still running."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"cryid run exited ({proc.returncode}) before {what}:\n{proc.stderr.read()}")  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s} s")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM ``cryid run`` (killed if it does not stop within 60 s); returns its stderr."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[1]


class NotifySocket:
    """A systemd-style NOTIFY_SOCKET (unix datagrams) that records what the daemon reports."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.extend(self._sock.recv(4096).decode().splitlines())
            except TimeoutError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


def _unit_watchdog_usec() -> str:
    unit = (REPO / "deploy" / "cryid.service").read_text()
    m = re.search(r"^WatchdogSec=(\d+)$", unit, re.M)
    assert m, "deploy/cryid.service has no WatchdogSec="
    return str(int(m.group(1)) * 1_000_000)


def _sandbox_prefix() -> list[str]:
    """The command prefix that applies deploy/cryid.service's seccomp sandbox (tests/unit_sandbox.py)."""
    python = "/usr/bin/python3"
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd; .ci/run does)")
    if subprocess.run([python, "-c", "import seccomp"], capture_output=True).returncode != 0:
        pytest.skip("libseccomp's Python bindings are missing: apt-get install python3-seccomp (.ci/run)")
    return [python, str(REPO / "tests" / "unit_sandbox.py"), str(REPO / "deploy" / "cryid.service"), "--"]


@pytest.mark.parametrize("sandbox", [False, True], ids=["plain", "unit-seccomp-sandbox"])
def test_cry_played_into_virtual_mic_is_identified(
    sandbox: bool,
    virtual_mic: dict[str, str],
    mosquitto: Broker,
    subscriber_factory: Callable[..., Subscriber],
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    model = REPO / "models" / "default"
    env = cryid_env(virtual_mic)
    env |= {
        "CRYID_STATE_DIR": str(tmp_path / "state"),
        "CRYID_MODEL": str(model),
        "CRYID_ROOM": ROOM,
        "CRYID_MQTT__HOST": mosquitto.host,
        "CRYID_MQTT__PORT": str(mosquitto.port),
        "CRYID_SOURCE__DEVICE": "pulse",  # ALSA's PulseAudio plugin, i.e. the virtual microphone
    }  # the daemon's default decision settings
    babies, cry = _babies(tmp_path)
    baby = babies[0][0]
    assert cry not in babies[0][1]  # held back: not part of the enrollment
    for b, files in babies:
        res = subprocess.run([*CRYID, "enroll", "add", b, *map(str, files)], env=env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        assert res.returncode == 0, res.stderr

    # As systemd runs Type=notify with WatchdogSec= (deploy/cryid.service).
    notify = NotifySocket(tmp_path / "notify")
    request.addfinalizer(notify.close)
    env |= {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": _unit_watchdog_usec()}
    sub = subscriber_factory(mosquitto, f"cryid/{ROOM}/#")
    # With sandbox: under the unit's system-call filter, address families and MemoryDenyWriteExecute.
    prefix = _sandbox_prefix() if sandbox else []
    daemon = subprocess.Popen([*prefix, *CRYID, "-v", "run", "--source", "mic"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait(lambda: any(m.topic.endswith("/status") and m.payload == b"online" for m in sub.messages),
              "online status", daemon, 120)  # fmt: skip
        played = subprocess.run(["paplay", "--device=virtmic", str(cry)], env=env, capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        assert played.returncode == 0, played.stderr
        _wait(lambda: any(e["kind"] == "episode" for e in sub.events()), "episode event", daemon, 120)
    finally:
        err = _stop(daemon)
    assert daemon.returncode == 0, err[-3000:]
    events = sub.events()
    episodes = [e for e in events if e["kind"] == "episode"]
    assert len(episodes) == 1, events
    ep = episodes[0]
    seen = {k: ep[k] for k in ("score", "margin", "confidence", "best_baby_id", "n_candidates")}
    # The held-back cry ranks its own baby first with a clear margin and a high calibrated confidence
    # (about 0.9 or more here); the daemon's default decision follows its rule exactly: named when the
    # confidence reaches identifier.min_confidence_unconfirmed (no cry is confirmed here; default: never),
    # else unknown with candidates.
    assert ep["best_baby_id"] == baby and ep["confidence"] >= 0.9, seen
    assert ep["candidates"][0]["baby_id"] == baby, seen
    unconfirmed = IdentifierSettings().min_confidence_unconfirmed  # nobody confirmed a cry in this test
    named = unconfirmed < 1.0 and ep["confidence"] >= unconfirmed
    assert (ep["decision"], ep["baby_id"]) == (("identified", baby) if named else ("unknown", None)), seen
    assert ep["_topic"] == f"cryid/{ROOM}/" + (f"baby/{baby}" if named else "unknown")
    assert ep["n_expirations"] >= 1 and ep["score"] > ep["runner_up"]["score"]
    assert ep["runner_up"]["baby_id"] in {b for b, _ in babies[1:]}
    # The cry was captured live: it starts after the daemon had been listening to silence.
    assert ep["stream_offset_s"] > 0.0
    assert any(e["kind"] == "expiration" for e in events)
    notify.close()
    assert "READY=1" in notify.messages and "WATCHDOG=1" in notify.messages, notify.messages
    assert notify.messages.index("READY=1") < notify.messages.index("WATCHDOG=1")
    assert "STOPPING=1" in notify.messages


def test_enroll_record_captures_a_cry_from_the_virtual_mic(
    virtual_mic: dict[str, str], tmp_path: Path
) -> None:
    """``cryid enroll record`` enrolls from live audio: a recording played into the virtual microphone
    while it records gives the same baby as ``cryid enroll add`` of that recording (centroids agree)."""
    import numpy as np
    import soundfile as sf

    from cryid.enrollment.config import RegistrySettings
    from cryid.enrollment.registry import Registry
    from cryid.models.embedder import Embedder

    model = REPO / "models" / "default"
    babies, _ = _babies(tmp_path)
    cry = babies[0][1][0]
    env = cryid_env(virtual_mic) | {"CRYID_MODEL": str(model)}
    seconds = f"{sf.info(str(cry)).duration + 4.0:.1f}"
    rec = subprocess.Popen(
        [*CRYID, "enroll", "record", "live", "--seconds", seconds, "--device", "pulse"],
        env=env | {"CRYID_STATE_DIR": str(tmp_path / "live")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert rec.stderr is not None
    line = rec.stderr.readline()  # printed once the model is loaded, just before recording starts
    assert line.startswith("recording ") and "from input device pulse" in line, line + rec.stderr.read()
    time.sleep(0.5)  # let PortAudio open the stream
    played = subprocess.run(
        ["paplay", "--device=virtmic", str(cry)], env=env, capture_output=True, text=True, timeout=60
    )
    assert played.returncode == 0, played.stderr
    out, err = rec.communicate(timeout=120)
    assert rec.returncode == 0, err
    assert out.startswith("enrolled live: 1 recording"), out
    added = subprocess.run(
        [*CRYID, "enroll", "add", "file", str(cry)],
        env=env | {"CRYID_STATE_DIR": str(tmp_path / "file")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert added.returncode == 0, added.stderr
    sha = Embedder(model).sha256
    with Registry.open(tmp_path / "live", RegistrySettings()) as live:
        (sample,) = live.samples("live")
        a = live.centroids(sha)["live"]
    with Registry.open(tmp_path / "file", RegistrySettings()) as ref:
        (reference,) = ref.samples("file")
        b = ref.centroids(sha)["file"]
    assert sample.source_kind == "mic" and sample.n_expirations >= 1
    assert abs(sample.cry_s - reference.cry_s) < 1.0
    cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    print(f"\nenroll record vs enroll add of the same cry: centroid cosine {cos:.4f}")
    assert cos >= 0.9
