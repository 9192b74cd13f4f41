"""Only the room's babies: the daemon compares a cry with the active babies enrolled in its own room, and
``cryid enroll move`` moves a baby between rooms, followed by a running daemon without a restart.

Real parts: the ONNX fixture model (random weights, uncalibrated: the daemon decides on the cosine
thresholds that ``tests/test_service.py`` checks it separates the generated voices with), generated cry
voices (``cryid.daemon.nursery``), ``cryid run --source -`` and ``cryid enroll move`` as subprocesses,
a real mosquitto, a real SQLite registry.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cryid.daemon import nursery
from cryid.daemon.config import Settings
from cryid.enrollment.registry import Registry
from cryid.models.embedder import Embedder
from tests.fixtures.broker import Broker, Subscriber
from tests.fixtures.cli import cryid_env
from tests.test_roundtrip import LogTail

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`

SR = 16000
CRYID = [sys.executable, "-m", "cryid.daemon.cli"]
ROOMS = {"ada": "ward1", "ben": "ward1", "cy": "ward2"}
THRESHOLDS = {"min_score": "0.975", "min_margin": "0.02"}  # the random fixture model's cosine scale


@pytest.fixture()
def state(onnx_model_dir: Path, tmp_path: Path) -> Path:
    """ada and ben enrolled in ward1, cy in ward2 (voices 0-2 of ``nursery.voices(4, seed=1)``)."""
    state = tmp_path / "state"
    settings = Settings(state_dir=state, model=onnx_model_dir)
    voices = nursery.voices(4, seed=1)
    embedder = Embedder(onnx_model_dir)
    with Registry.open(state, settings.registry) as registry:
        for i, (baby, room) in enumerate(ROOMS.items()):
            nursery.enroll(
                registry, embedder, settings, baby, [nursery.bout(voices[i], 6, seed=100 + i)], room
            )
    return state


def _env(state: Path, model: Path, broker: Broker | None = None) -> dict[str, str]:
    env = cryid_env()
    env.update(CRYID_ROOM="ward1", CRYID_STATE_DIR=str(state), CRYID_MODEL=str(model))
    env.update({f"CRYID_IDENTIFIER__{k.upper()}": v for k, v in THRESHOLDS.items()})
    if broker is not None:
        env.update(CRYID_MQTT__HOST=broker.host, CRYID_MQTT__PORT=str(broker.port))
    return env


def _pcm(baby_index: int, seed: int) -> bytes:
    """A bout of one voice, then quiet long enough for its episode to close."""
    rng = np.random.default_rng(seed)
    voice = nursery.voices(4, seed=1)[baby_index]
    bout = nursery.bout(voice, 3.0, seed=200 + baby_index)
    wav = np.concatenate([nursery.room_noise(1.0, rng), bout, nursery.room_noise(8.0, rng)])
    return (np.clip(wav, -1, 32767 / 32768) * 32768).astype("<i2").tobytes()


def _move(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [*CRYID, "enroll", "move", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def test_the_daemon_names_only_its_rooms_babies_and_follows_moves(
    onnx_model_dir: Path, state: Path, mosquitto: Broker, subscriber_factory: Callable[..., Subscriber]
) -> None:
    env = _env(state, onnx_model_dir, mosquitto)
    sub = subscriber_factory(mosquitto, "cryid/ward1/#")
    daemon = subprocess.Popen(
        [*CRYID, "-v", "run", "--source", "-"], env=env, stdin=subprocess.PIPE, stderr=subprocess.PIPE
    )
    log = LogTail(daemon.stderr)
    log.start()
    episodes = lambda: [e for e in sub.events() if e["kind"] == "episode"]  # noqa: E731

    def cry(baby_index: int, seed: int) -> dict[str, object]:
        n = len(episodes())
        assert daemon.stdin is not None
        daemon.stdin.write(_pcm(baby_index, seed))
        daemon.stdin.flush()
        sub.wait_for(lambda m: len(episodes()) > n, timeout_s=120)
        return episodes()[n]

    try:
        log.wait_for("registry: 2 babies enrolled in room ward1", daemon)
        # 1. cy is enrolled, but in ward2: ward1's daemon never compares a cry with cy
        ep = cry(2, seed=1)
        assert ep["baby_id"] != "cy" and ep["best_baby_id"] in {"ada", "ben"}, ep
        assert ep["n_candidates"] == 2 and {c["baby_id"] for c in ep["candidates"]} == {"ada", "ben"}
        assert ep["confidence"] is None  # the fixture model has no calibration
        ep = cry(1, seed=2)
        assert ep["decision"] == "identified" and ep["baby_id"] == "ben", ep

        # 2. cy moves into ward1: the running daemon follows within its registry poll and names cy
        n_lines = len(log.lines)
        done = _move(env, "cy", "ward1")
        assert done.returncode == 0 and done.stdout.strip() == "moved cy from room ward2 to room ward1", done
        log.wait_for("registry: 3 babies enrolled in room ward1", daemon, after=n_lines)
        ep = cry(2, seed=3)
        assert ep["decision"] == "identified" and ep["baby_id"] == "cy", ep
        assert ep["n_candidates"] == 3

        # 3. ben moves out: ben's cry is no longer named ben
        n_lines = len(log.lines)
        assert _move(env, "ben", "ward2").returncode == 0
        log.wait_for("removed ben", daemon, after=n_lines)
        ep = cry(1, seed=4)
        assert ep["baby_id"] != "ben" and "ben" not in {c["baby_id"] for c in ep["candidates"]}, ep
        assert ep["n_candidates"] == 2
        assert daemon.poll() is None  # never restarted
        daemon.stdin.close()  # type: ignore[union-attr]
        assert daemon.wait(timeout=120) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def _registry_bytes(state: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(state.iterdir())
        if p.name.startswith("registry.sqlite3")
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("dora", "ward1"), "baby 'dora' is not enrolled; see `cryid enroll list`"),
        (("ada", "ward 7!"), "room 'ward 7!' is not allowed"),
        (("ada", ""), "room '' is not allowed"),
        (("ada/#", "ward1"), "baby id 'ada/#' is not allowed"),
    ],
)
def test_enroll_move_errors_are_one_line_and_change_nothing(
    onnx_model_dir: Path, state: Path, args: tuple[str, str], message: str
) -> None:
    before = _registry_bytes(state)
    done = _move(_env(state, onnx_model_dir), *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cryid: error: ") and message in lines[0], done.stderr
    assert _registry_bytes(state) == before


def test_enroll_move_changes_only_the_room(onnx_model_dir: Path, state: Path) -> None:
    env = _env(state, onnx_model_dir)
    with Registry.open(state) as reg:
        before = reg.get_infant("cy")
        sha = Embedder(onnx_model_dir).sha256
        assert set(reg.centroids(sha, room="ward1")) == {"ada", "ben"}
        cy_centroid = reg.centroids(sha)["cy"]
    done = _move(env, "cy", "ward1")
    assert done.returncode == 0, done.stderr
    again = _move(env, "cy", "ward1")
    assert again.returncode == 0 and again.stdout.strip() == "cy is already in room ward1"
    with Registry.open(state) as reg:
        after = reg.get_infant("cy")
        assert after is not None and before is not None
        assert after.room == "ward1" and after.status == before.status == "active"
        assert set(reg.centroids(sha, room="ward1")) == {"ada", "ben", "cy"}
        assert reg.centroids(sha, room="ward2") == {}
        np.testing.assert_array_equal(reg.centroids(sha)["cy"], cy_centroid)
        assert reg.needs_reenrollment(sha, room="ward1") == []
