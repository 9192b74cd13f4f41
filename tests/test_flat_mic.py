"""A dead or flat microphone: the FlatDetector stage, then the real capture path (PulseAudio virtual
microphone -> PortAudio -> ``cryid run --source mic``) playing zeros, then a cry: retained
``cryid/<room>/status/source`` goes ``flat`` and back to ``ok``, with a log line, /healthz and metrics."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cryid.daemon import nursery
from cryid.daemon.flatness import FlatDetector
from tests.fixtures.broker import Broker, Subscriber, free_port
from tests.fixtures.cli import cryid_env
from tests.fixtures.pulse import PulseServer
from tests.test_metrics_http import get, model_dir, scrape
from tests.test_virtual_mic import CRYID, _stop, _wait

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


def _mic_daemon_env(
    base: dict[str, str], request: pytest.FixtureRequest, mosquitto: Broker, tmp_path: Path, port: int,
    **extra: str,
) -> dict[str, str]:
    """``cryid run --source mic`` on ALSA's ``pulse`` device of the PulseAudio in ``base``, metrics on
    ``port``; ``extra``: more CRYID_ settings."""
    env = cryid_env(base)
    return env | {
        "CRYID_STATE_DIR": str(tmp_path / "state"),
        "CRYID_MODEL": str(model_dir(request)),
        "CRYID_ROOM": ROOM,
        "CRYID_MQTT__HOST": mosquitto.host,
        "CRYID_MQTT__PORT": str(mosquitto.port),
        "CRYID_SOURCE__DEVICE": "pulse",
        "CRYID_METRICS__PORT": str(port),
        **extra,
    }


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
    virtual_mic: dict[str, str],
    mosquitto: Broker,
    subscriber_factory: Callable[..., Subscriber],
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    port = free_port()
    env = _mic_daemon_env(virtual_mic, request, mosquitto, tmp_path, port, CRYID_SOURCE__FLAT_TIMEOUT_S="2")
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
    env = _mic_daemon_env(pulse.env, request, mosquitto, tmp_path, port, CRYID_SOURCE__REOPEN_MAX_S="1")
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
