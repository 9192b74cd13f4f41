"""A dead or flat microphone: the FlatDetector stage, then the real capture path (PulseAudio virtual
microphone -> PortAudio -> ``cryid run --source mic``) playing zeros, then a cry: retained
``cryid/<room>/status/source`` goes ``flat`` and back to ``ok``, with a log line, /healthz and metrics."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cryid.daemon import nursery
from cryid.daemon.flatness import FlatDetector
from tests.fixtures.broker import Broker, Subscriber, free_port
from tests.test_metrics_http import get, model_dir, scrape
from tests.test_virtual_mic import CRYID, _stop, _wait, virtual_mic  # noqa: F401 (the fixture)

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`

SR = 16000
ROOM = "flat-test"


def feed(det: FlatDetector, wav: np.ndarray, chunk: int = 640) -> list[str]:
    changes = []
    for i in range(0, wav.size, chunk):
        c = det.process(wav[i : i + chunk])
        if c is not None:
            changes.append(c)
    return changes


@pytest.mark.parametrize(
    ("flat", "kind"),
    [
        (np.zeros(3 * SR, np.float32), "digital silence"),
        (np.full(3 * SR, 0.25, np.float32), "constant value +0.25000"),
        (np.full(3 * SR, -1.0, np.float32), "clipped flat line at -1.000"),
        # one LSB of dither on silence is still no signal
        (np.random.default_rng(0).integers(-1, 2, 3 * SR).astype(np.float32) / 32768, "digital silence"),
    ],
    ids=["zeros", "constant", "clipped", "lsb-dither"],
)
def test_flat_line_after_the_timeout_then_ok_with_sound(flat: np.ndarray, kind: str) -> None:
    det = FlatDetector(2.0, SR)
    assert feed(det, flat[: int(1.9 * SR)]) == []  # not yet: shorter than the timeout
    assert feed(det, flat[int(1.9 * SR) :]) == ["flat"]
    assert det.describe().startswith(kind) and det.describe().endswith("for 3 s")
    cry = nursery.bout(nursery.voices(1, seed=2)[0], 1.0, seed=1).astype(np.float32)
    assert feed(det, cry) == ["ok"]
    assert det.level_dbfs() is not None and det.level_dbfs() > -40


def test_a_quiet_room_is_not_flat() -> None:
    det = FlatDetector(1.0, SR)
    quiet = nursery.room_noise(5.0, np.random.default_rng(1), level_dbfs=-70.0).astype(np.float32)
    assert feed(det, quiet) == []
    assert det.state == "ok" and -75 < (det.level_dbfs() or 0) < -65


def test_a_constant_that_jumps_between_chunks_is_flat_only_when_it_stays() -> None:
    det = FlatDetector(1.0, SR)
    steps = np.concatenate([np.full(SR // 2, v, np.float32) for v in (0.1, 0.3, 0.1, 0.3)])
    assert feed(det, steps) == []  # a square wave of half-second steps carries a signal
    assert feed(det, np.full(SR, 0.3, np.float32)) == ["flat"]


def test_virtual_mic_playing_zeros_then_a_cry(
    virtual_mic: dict[str, str],  # noqa: F811
    mosquitto: Broker,
    subscriber_factory: Callable[..., Subscriber],
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    port = free_port()
    env = {k: v for k, v in virtual_mic.items() if not k.startswith("CRYID_")}
    env |= {
        "CRYID_STATE_DIR": str(tmp_path / "state"),
        "CRYID_MODEL": str(model_dir(request)),
        "CRYID_ROOM": ROOM,
        "CRYID_MQTT__HOST": mosquitto.host,
        "CRYID_MQTT__PORT": str(mosquitto.port),
        "CRYID_SOURCE__DEVICE": "pulse",
        "CRYID_SOURCE__FLAT_TIMEOUT_S": "2",
        "CRYID_METRICS__PORT": str(port),
    }
    zeros, cry = tmp_path / "zeros.wav", tmp_path / "cry.wav"
    sf.write(zeros, np.zeros(4 * SR, np.int16), SR, subtype="PCM_16")
    sf.write(cry, nursery.bout(nursery.voices(1, seed=3)[0], 4.0, seed=9), SR, subtype="PCM_16")
    sub = subscriber_factory(mosquitto, f"cryid/{ROOM}/#")
    source_topic = f"cryid/{ROOM}/status/source"

    def states() -> list[str]:
        return [m.payload.decode() for m in sub.messages if m.topic == source_topic]

    daemon = subprocess.Popen([*CRYID, "run", "--source", "mic"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait(lambda: b"online" in [m.payload for m in sub.messages], "online status", daemon, 120)
        played = subprocess.run(["paplay", "--device=virtmic", str(zeros)], env=env, capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        assert played.returncode == 0, played.stderr
        _wait(lambda: "flat" in states(), "flat status", daemon, 30)
        code, body = get(f"http://127.0.0.1:{port}/healthz")
        assert code == 503 and body.startswith("microphone flat: digital silence for "), body
        m = scrape(port)
        assert m[("cryid_source_flat", ())] == 1 and m[("cryid_source_up", ())] == 0
        assert m[("cryid_source_flats_total", ())] >= 1

        played = subprocess.run(["paplay", "--device=virtmic", str(cry)], env=env, capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        assert played.returncode == 0, played.stderr
        first_flat = states().index("flat")
        _wait(lambda: "ok" in states()[first_flat:], "ok status after the cry", daemon, 30)
        _wait(lambda: any(e["kind"] == "episode" for e in sub.events()), "the cry's episode", daemon, 60)
    finally:
        err = _stop(daemon)
    assert daemon.returncode == 0, err[-3000:]
    assert "microphone flat: digital silence for 2 s" in err, err[-3000:]
    assert "microphone delivers sound again after a flat line" in err
    retained = [m for m in sub.messages if m.topic == source_topic]
    assert all(m.payload in (b"ok", b"flat") for m in retained)
    ep = next(e for e in sub.events() if e["kind"] == "episode")
    assert ep["decision"] == "unknown" and ep["_topic"] == f"cryid/{ROOM}/unknown"  # nobody enrolled


class PulseServer:
    """A private PulseAudio (as tests/test_virtual_mic.py's fixture) that can be killed and restarted."""

    def __init__(self, tmp_path: Path) -> None:
        from tests.test_virtual_mic import _need_capture_stack

        _need_capture_stack()
        runtime = tmp_path / "pulse-runtime"
        runtime.mkdir(mode=0o700)
        self.sock = runtime / "native"
        self.log_path = tmp_path / "pulseaudio.log"
        self.env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime), HOME=str(tmp_path),
                        PULSE_SERVER=f"unix:{self.sock}")  # fmt: skip
        self.env.pop("PULSE_COOKIE", None)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [
            "pulseaudio", "--daemonize=no", "--exit-idle-time=-1", "--use-pid-file=no", "-n",
            "--disable-shm=yes", "--log-target=stderr",
            f"--load=module-native-protocol-unix auth-anonymous=1 socket={self.sock}",
            "--load=module-null-sink sink_name=virtmic rate=16000 channels=1",
        ]  # fmt: skip
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while subprocess.run(["pactl", "info"], env=self.env, capture_output=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip("PulseAudio cannot run here: " + self.log_path.read_text()[-500:])
            time.sleep(0.1)
        subprocess.run(["pactl", "set-default-source", "virtmic.monitor"], env=self.env, check=True)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


def test_microphone_gone_is_down_then_ok_when_it_returns(
    mosquitto: Broker,
    subscriber_factory: Callable[..., Subscriber],
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    pulse = PulseServer(tmp_path)
    pulse.start()
    request.addfinalizer(pulse.kill)
    port = free_port()
    env = {k: v for k, v in pulse.env.items() if not k.startswith("CRYID_")}
    env |= {
        "CRYID_STATE_DIR": str(tmp_path / "state"),
        "CRYID_MODEL": str(model_dir(request)),
        "CRYID_ROOM": ROOM,
        "CRYID_MQTT__HOST": mosquitto.host,
        "CRYID_MQTT__PORT": str(mosquitto.port),
        "CRYID_SOURCE__DEVICE": "pulse",
        "CRYID_SOURCE__REOPEN_MAX_S": "1",
        "CRYID_METRICS__PORT": str(port),
    }
    sub = subscriber_factory(mosquitto, f"cryid/{ROOM}/status/source")
    daemon = subprocess.Popen([*CRYID, "run", "--source", "mic"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip

    def states() -> list[bytes]:
        return [m.payload for m in sub.messages]

    try:
        _wait(lambda: states()[-1:] == [b"ok"], "ok status", daemon, 120)
        # the device is open ("ok"); /healthz is 200 once its first audio has reached the pipeline
        _wait(lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200, "healthy", daemon, 30)
        pulse.kill()  # the sound server (the "device") disappears
        _wait(lambda: states()[-1:] == [b"down"], "down status", daemon, 60)
        code, body = get(f"http://127.0.0.1:{port}/healthz")
        assert code == 503 and body.startswith("audio source down: "), body
        m = scrape(port)
        assert m[("cryid_source_up", ())] == 0 and m[("cryid_source_reopens_total", ())] >= 1
        pulse.start()
        _wait(lambda: states()[-1:] == [b"ok"], "ok status after the device returned", daemon, 60)
        _wait(lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200, "healthy again", daemon, 30)
    finally:
        err = _stop(daemon)
    assert daemon.returncode == 0, err[-3000:]
