"""Round trip with a running daemon and real cries: enroll from B recordings, a D recording identifies
the baby, ``remove`` makes the same recording come out ``unknown``; the daemon is never restarted.

Everything is real: donateacry-cc cries, the shipped model (``models/default``, no torch needed),
``cryid run --source -`` as a subprocess, ``cryid enroll`` subprocesses, mosquitto, and the daemon's
calibrated decision (at 0.8, also for babies without a nurse-confirmed cry; see the environment). The
babies are chosen so that the shipped model separates them by far
(the D recording scores about 0.7 against its own B centroid and below 0 against the others; the
test checks that first, on the same audio, pipeline and centroids, in a scratch registry): what the
test checks is the registry-to-daemon path, not the model's accuracy. The daemon must pick up the
removal within docs/enrollment.md's bound (``service.registry_poll_s``, 1 s by default) plus a tolerance for
a loaded machine.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cryid.daemon.config import Settings
from cryid.enrollment import enroll
from cryid.enrollment.config import RegistrySettings
from cryid.enrollment.registry import Registry
from cryid.models.audio import load_audio
from cryid.models.config import SegmenterSettings
from cryid.models.embedder import Embedder
from cryid.models.pipeline import embed_expirations
from cryid.models.scoring import centroid, cosine_matrix
from tests.fixtures.broker import Broker, Subscriber
from tests.fixtures.cli import cryid_env
from tests.fixtures.data import dac_rows
from tests.fixtures.logtail import LogTail

pytestmark = pytest.mark.slow

SR = 16000
TARGET = "dac0126"  # shipped model: its D recording scores 0.69 against its own B centroid
OTHERS = ["dac0059", "dac0084"]  # ... and below 0 against these two
CRYID = [sys.executable, "-m", "cryid.daemon.cli"]
EPISODE_GAP_S = 3.0  # IdentifierSettings.episode_gap_s default
PICKUP_TOLERANCE_S = 2.0  # scheduling on a loaded CI machine, on top of service.registry_poll_s


def files(dac_dir: Path, baby_id: str, period: str) -> list[str]:
    rows = dac_rows(split="dev", period=period)
    return [str(dac_dir / r["file_name"]) for r in rows if r["baby_id"] == baby_id]


def feed_audio(d_file: str) -> np.ndarray:
    """Quiet room noise, the D recording, then long enough quiet for the episode to close; int16-exact."""
    rng = np.random.default_rng(7)
    quiet = lambda s: (rng.standard_normal(int(s * SR)) * 10 ** (-70 / 20)).astype(np.float32)  # noqa: E731
    wav = np.concatenate([quiet(1.0), load_audio(d_file), quiet(10.0)])
    return np.round(np.clip(wav, -1, 32767 / 32768) * 32768).astype("<i2").astype(np.float32) / 32768.0


def test_enroll_identify_remove_unknown_without_restart(
    shipped_model_dir: Path,
    dac_dir: Path,
    mosquitto: Broker,
    subscriber_factory: Callable[..., Subscriber],
    tmp_path: Path,
) -> None:
    babies = [TARGET, *OTHERS]
    seg = SegmenterSettings()
    embedder = Embedder(shipped_model_dir)

    # 1. Beforehand, in a scratch registry: the centroids enrollment will produce, and the D recording's
    #    episode embedding as the daemon will see it (same stream, same segmenter, same embedder).
    with Registry.open(tmp_path / "scratch", RegistrySettings()) as scratch:
        for b in babies:
            samples = enroll.prepare_files(
                [Path(f) for f in files(dac_dir, b, "B")],
                period="birth",
                segmenter=seg,
                embedder_factory=lambda: embedder,
                keep_audio=False,
            )
            enroll.add(scratch, b, samples, RegistrySettings(), room="ward1")
        cents = scratch.centroids(embedder.sha256)
    feed = feed_audio(files(dac_dir, TARGET, "D")[0])
    items = embed_expirations(np.concatenate([feed, feed]), seg, embedder)
    half = feed.size
    groups = [
        [it for it in items if it.expiration.start_sample < half],
        [it for it in items if it.expiration.start_sample >= half],
    ]
    for g in groups:
        starts = [it.expiration.start_sample for it in g]
        ends = [it.expiration.end_sample for it in g]
        assert g and all(s - e < EPISODE_GAP_S * SR for s, e in zip(starts[1:], ends[:-1], strict=True)), (
            "the D recording must form one crying episode"
        )
    ids = sorted(cents)
    matrix = np.stack([cents[b] for b in ids])
    ep = [centroid(np.stack([it.embedding for it in g])) for g in groups]
    s1 = cosine_matrix(ep[0], matrix)[0]
    own, best_other = float(s1[ids.index(TARGET)]), float(max(s1[ids.index(b)] for b in OTHERS))
    s2 = cosine_matrix(ep[1], matrix)[0]
    after_removal = float(max(s2[ids.index(b)] for b in OTHERS))
    assert own > 0.6 and max(best_other, after_removal) < 0.2, (
        f"the shipped model no longer separates {TARGET}'s D recording by far (own {own:.4f}, others "
        f"{best_other:.4f}); choose other babies in this test"
    )

    # 2. The daemon, started on an EMPTY registry.
    state = tmp_path / "state"
    env = cryid_env()
    env.update(
        CRYID_ROOM="ward1",
        CRYID_STATE_DIR=str(state),
        CRYID_MODEL=str(shipped_model_dir),
        CRYID_MQTT__HOST=mosquitto.host,
        CRYID_MQTT__PORT=str(mosquitto.port),
        # No nurse confirms a cry here, and by default a baby without a confirmed cry is never named. What is
        # checked is the registry-to-daemon path, not the operating point, so a baby is named here at 0.8,
        # confirmed or not: the shipped model's confidence for this D recording among 3 babies is 0.954 here,
        # too near the ward's 0.94 (it came out unknown in one CI run), while after the removal the best
        # other baby scores below 0.2 (checked above), far from any name.
        CRYID_IDENTIFIER__MIN_CONFIDENCE="0.8",
        CRYID_IDENTIFIER__MIN_CONFIDENCE_UNCONFIRMED="0.8",
    )
    sub = subscriber_factory(mosquitto, "cryid/ward1/#")
    daemon = subprocess.Popen(
        [*CRYID, "-v", "run", "--source", "-"], env=env, stdin=subprocess.PIPE, stderr=subprocess.PIPE
    )
    log = LogTail(daemon.stderr)
    log.start()
    try:
        sub.wait_for(
            lambda m: any(x.topic == "cryid/ward1/status" and x.payload == b"online" for x in m), 120
        )
        log.wait_for("0 babies", daemon)
        assert any("cryid run: room ward1" in x and "0 babies enrolled" in x for _, x in log.lines)

        # 3. Enroll from the B recordings with `cryid enroll add` while the daemon runs.
        for b in babies:
            done = subprocess.run(
                [*CRYID, "enroll", "add", b, *files(dac_dir, b, "B")], env=env, capture_output=True, text=True
            )
            assert done.returncode == 0, done.stderr
        log.wait_for("registry: 3 babies enrolled", daemon)
        with Registry.open(state, RegistrySettings()) as reg:
            for b, c in reg.centroids(embedder.sha256).items():
                np.testing.assert_allclose(c, cents[b], atol=1e-5)

        # 4. The D recording identifies the baby.
        pcm = (feed * 32768).astype("<i2").tobytes()
        assert daemon.stdin is not None
        daemon.stdin.write(pcm)
        daemon.stdin.flush()
        episodes = lambda: [e for e in sub.events() if e["kind"] == "episode"]  # noqa: E731
        sub.wait_for(lambda m: len(episodes()) >= 1, timeout_s=120)
        first = episodes()[0]
        assert first["decision"] == "identified" and first["baby_id"] == TARGET, (
            first["decision"],
            first["confidence"],
            first["candidates"],
        )
        assert any(m.topic == f"cryid/ward1/baby/{TARGET}" for m in sub.messages)

        # 5. Remove (discharge) the baby; the running daemon picks it up ...
        n_lines = len(log.lines)
        started = time.monotonic()
        done = subprocess.run([*CRYID, "enroll", "remove", TARGET], env=env, capture_output=True, text=True)
        returned = time.monotonic()
        assert done.returncode == 0, done.stderr
        seen = log.wait_for(f"removed {TARGET}", daemon, after=n_lines)
        poll_s = Settings().service.registry_poll_s
        print(
            f"daemon logged the removal {seen - returned:+.2f} s after `cryid enroll remove` returned "
            f"({seen - started:.2f} s after it started; bound {poll_s} s)"
        )
        assert seen - returned <= poll_s + PICKUP_TOLERANCE_S, "the removal was not picked up in time"

        # 6. ... and the same recording now comes out unknown.
        daemon.stdin.write(pcm)
        daemon.stdin.flush()
        sub.wait_for(lambda m: len(episodes()) >= 2, timeout_s=120)
        second = episodes()[1]
        assert second["decision"] == "unknown" and second["baby_id"] is None, second
        assert second["best_baby_id"] in OTHERS
        assert daemon.poll() is None  # never restarted
        daemon.stdin.close()
        assert daemon.wait(timeout=120) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
