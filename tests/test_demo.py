"""`cryid demo` end to end: enrollment, nursery stream, the daemon's MQTT path, decisions from the model's
calibration, candidates for unnamed episodes, the honest summary, the nurse's confirmations between the two
acts (through the registry, as `cryid enroll confirm`) and the second act that uses them, and no trace on a
live ward's broker.

The demo runs as a user runs it: with the shipped model (models/default). Until the shipped model carries
a calibration, the tests use a copy of it with a stand-in calibration fitted here with ``fit_calibration``
on donateacry-cc dev (enrolled from B recordings, queried with D recordings, rooms of 2-8 babies, a
quarter of the cries from a baby not in the room); once it carries one, they use the shipped model as is.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cryid.daemon import nursery
from cryid.daemon.config import IdentifierSettings
from cryid.daemon.demo import DEMO_PREFIX, NURSE, summary
from cryid.daemon.demo_mqtt import describe
from cryid.enrollment.config import RegistrySettings
from cryid.enrollment.registry import Registry
from cryid.models.audio import load_audio
from cryid.models.calibration import fit_calibration
from cryid.models.config import DEFAULT_MODEL_DIR, SegmenterSettings
from cryid.models.embedder import Embedder
from cryid.models.manifest import load_manifest
from cryid.models.pipeline import embed_expirations
from cryid.models.scoring import ReferenceSet, l2_normalize
from tests.fixtures.broker import Broker, Subscriber
from tests.fixtures.cli import cryid_env
from tests.fixtures.data import REPO_ROOT
from tests.fixtures.demo_output import (
    COUNTS_LINE,
    EPISODE_LINE,
    acts,
    check_confirmations,
    check_summary,
)

pytestmark = pytest.mark.slow  # starts mosquitto, a browser or subprocesses: not in `pytest -m "not slow"`

MIN_CONFIDENCE = IdentifierSettings().min_confidence  # the configured default: the demo invents none
UNCONFIRMED = IdentifierSettings().min_confidence_unconfirmed


def _demo(*args: str, **env_extra: str) -> subprocess.CompletedProcess[str]:
    """``cryid demo`` from the clone's folder, as the README runs it (real cries: ../shared/data)."""
    env = cryid_env()
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-m", "cryid.daemon.cli", "demo", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _fit_stand_in(model_dir: Path, dac_dir: Path) -> dict[str, object]:
    """A calibration of ``model_dir`` on donateacry-cc dev: B centroids, D recordings as episodes."""
    embedder = Embedder(model_dir)
    with open(dac_dir / "metadata.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "dev"]
    births: dict[str, list[np.ndarray]] = {}
    later: dict[str, list[np.ndarray]] = {}
    for r in rows:
        items = embed_expirations(load_audio(dac_dir / r["file_name"]), SegmenterSettings(), embedder)
        if items:
            vecs = l2_normalize(np.stack([it.embedding for it in items]))
            (births if r["period"] == "B" else later).setdefault(r["baby_id"], []).append(vecs)
    babies = sorted(set(births) & set(later))
    birth = {b: np.concatenate(births[b]).mean(axis=0) for b in babies}
    rng = np.random.default_rng(0)
    best, margin, n_cands, correct, score_rows, true_index = [], [], [], [], [], []
    for _ in range(3000):
        n = int(rng.integers(2, 9))
        crying = babies[int(rng.integers(len(babies)))]
        enrolled = bool(rng.random() < 0.75)
        others = rng.choice([b for b in babies if b != crying], n - 1 if enrolled else n, replace=False)
        refs = ReferenceSet({b: birth[b] for b in [*others, *([crying] if enrolled else [])]})
        query = later[crying][int(rng.integers(len(later[crying])))].mean(axis=0)
        scores = refs.scores(query)
        order = np.argsort(-scores)
        best.append(float(scores[order[0]]))
        margin.append(float(scores[order[0]] - scores[order[1]]))
        n_cands.append(n)
        correct.append(enrolled and refs.ids[int(order[0])] == crying)
        if enrolled:
            score_rows.append(scores)
            true_index.append(refs.ids.index(crying))
    cal = fit_calibration(
        np.array(best),
        np.array(margin),
        np.array(n_cands),
        np.array(correct),
        score_rows,
        true_index,
        data="stand-in (tests/test_demo.py): donateacry-cc dev B->D, rooms of 2-8, 25% strangers",
    )
    return json.loads(cal.model_dump_json())


@pytest.fixture(scope="module")
def demo_model(dac_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped model if it is calibrated, else a copy with a stand-in calibration."""
    if load_manifest(DEFAULT_MODEL_DIR).calibration is not None:
        return DEFAULT_MODEL_DIR
    model = tmp_path_factory.mktemp("calibrated") / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["calibration"] = _fit_stand_in(model, dac_dir)
    (model / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return model


class WardDaemonSession:
    """A stand-in for a live ward daemon's MQTT session (its client id), counting disconnects."""

    def __init__(self, broker: Broker, client_id: str) -> None:
        self.disconnects = 0
        self._up = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_connect = lambda *a: self._up.set()
        self.client.on_disconnect = self._on_disconnect
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()
        if not self._up.wait(10):
            raise TimeoutError("ward session could not connect")

    def _on_disconnect(self, *args: object) -> None:
        self.disconnects += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_demo_on_real_cries_uses_the_calibration_and_never_touches_the_ward(
    demo_model: Path, mosquitto: Broker, subscriber_factory: Callable[..., Subscriber], tmp_path: Path
) -> None:
    """A ward daemon (room nursery, client id cryid-nursery) shares the broker: the demo publishes only
    under cryid-demo/..., never takes the ward's session, and leaves no retained topic behind."""
    ward = subscriber_factory(mosquitto, "cryid/#")
    demo_topics = subscriber_factory(mosquitto, f"{DEMO_PREFIX}/#")
    session = WardDaemonSession(mosquitto, "cryid-nursery")
    try:
        done = _demo(
            "--broker",
            f"127.0.0.1:{mosquitto.port}",
            "--keep",
            str(tmp_path / "demo"),
            CRYID_MODEL=str(demo_model),
            CRYID_ROOM="nursery",
            CRYID_MQTT__CLIENT_ID="cryid-nursery",
            CRYID_MQTT__TOPIC_PREFIX="cryid/nursery",
            CRYID_MQTT__HOST="127.0.0.1",
            CRYID_MQTT__PORT=str(mosquitto.port),
        )
        print(done.stdout)
        assert done.returncode == 0, done.stderr
        time.sleep(1.0)  # anything stray would have arrived by now
        assert session.disconnects == 0
    finally:
        session.close()
    assert ward.messages == [], [m.topic for m in ward.messages]
    out = done.stdout
    assert f"using the MQTT broker at 127.0.0.1:{mosquitto.port} (demo topics only)" in out
    assert "real cries" in out and "enrolled from a first recording session, crying from a later one" in out
    rule = f"decisions: a baby is named when its calibrated confidence >= min_confidence {MIN_CONFIDENCE}"
    assert rule in out
    assert "NO calibration" not in out and "min_score" not in out
    act1, nurse, act2 = acts(out)
    # every final episode is printed with its decision and confidence; unnamed ones with candidates
    episodes = EPISODE_LINE.findall(out)
    assert len(EPISODE_LINE.findall(act1)) >= 3 and len(EPISODE_LINE.findall(act2)) >= 3
    for line in episodes:
        assert re.search(r"confidence [01]\.\d\d", line), line
        if "not named" in line:
            assert re.search(r"probably (dac\d{4} [01]\.\d\d(, )?){2,3}", line), line
    assert any("not named" in line for line in episodes)  # real cries across sessions: some are not named
    assert COUNTS_LINE.match(out.strip().splitlines()[-1])  # the last line: act 2's counts
    confirms = check_confirmations(act1, nurse)
    check_summary(act2)
    # what was printed is what was published, on the demo's own topics: act 1's episodes, then act 2's
    events = [e for e in demo_topics.events() if e["kind"] == "episode"]
    assert len(events) == len(episodes)
    for e in events:
        assert e["_topic"].startswith(f"{DEMO_PREFIX}/") and e["room"] == "demo" and e["schema_version"] == 2
        assert e["confidence"] is not None and 1 <= len(e["candidates"]) <= 3 and e["n_candidates"] == 3
    n1 = len(EPISODE_LINE.findall(act1))
    first, second = events[:n1], events[n1:]
    # the nurse's confirmations reached the registry through `cryid enroll confirm`'s call: live confirm rows
    # of act-1 episodes, and confirmed references of those babies
    with Registry.open(tmp_path / "demo", RegistrySettings()) as reg:
        rows = [f for f in reg.feedback() if f.live]
        _, confirmed = reg.references(events[0]["model_sha256"], "demo")
    assert sorted((f.confirmation_id, f.episode_id, f.baby_id) for f in rows) == sorted(
        (int(cid), episode, baby) for _, baby, cid, episode in confirms
    )
    assert all(
        f.kind == "confirm" and f.via == "cli" and f.created_by == NURSE and f.room == "demo" for f in rows
    )
    assert {f.episode_id for f in rows} <= {e["episode_id"] for e in first}
    assert set(confirmed) == {baby for _, baby, _, _ in confirms}
    # the identifier took them as confirmed: each confidence is the calibration's with the best candidate's
    # confirmed flag (act 1: nobody confirmed; act 2: the confirmed babies), and a baby is named only at
    # min_confidence_unconfirmed (default never) in act 1, at min_confidence once confirmed in act 2
    cal = load_manifest(demo_model).calibration
    assert cal is not None and "best_confirmed" in cal.features
    flipped = 0  # act-2 events whose confidence is not the one an unconfirmed best candidate would get
    for act, known in ((first, set()), (second, set(confirmed))):
        for e in act:
            best = e["best_baby_id"] in known
            others = [c["score"] for c in e["candidates"][1:]]
            args = (e["score"], e["margin"], e["n_candidates"])
            kw = {
                "runner_confirmed": e["runner_up"]["baby_id"] in known,
                "others_mean": float(np.mean(others)),
            }
            # the payload rounds scores and confidences to 5 decimals
            want = cal.confidence(*args, best_confirmed=best, **kw)
            assert e["confidence"] == pytest.approx(want, abs=1e-4), e
            if best and e["confidence"] != pytest.approx(cal.confidence(*args, **kw), abs=1e-4):
                flipped += 1
            need = MIN_CONFIDENCE if best else UNCONFIRMED
            assert (e["baby_id"] is None) == (need >= 1.0 or e["confidence"] < need), e
            # each candidate says whether the registry held a confirmed cry of it when the cry was decided
            flags = {c["baby_id"]: c["confirmed"] for c in e["candidates"]}
            assert flags == {baby: baby in known for baby in flags}, e
            # and an unnamed cry why (the demo sets no expert override): its best candidate unconfirmed
            # although min_confidence was reached, or not sure enough
            if e["baby_id"] is None:
                not_confirmed = not best and e["confidence"] >= MIN_CONFIDENCE
                want_reason = "not_confirmed" if not_confirmed else "below_min_confidence"
                assert e["reason"] == want_reason, e
            else:
                assert e["reason"] is None, e
    assert flipped >= 1
    reasons = Counter(e["reason"] for e in events)
    print("reasons of the final episodes, act 1 + act 2:", dict(reasons))
    # the printed lines say it too
    decision = re.compile(r" (named|not named(?: \([^)]*\))?)  confidence")
    printed = Counter(decision.search(line)[1] for line in episodes)  # type: ignore[index]
    assert printed == Counter(
        {
            "not named (no confirmed cry yet)": reasons["not_confirmed"],
            "not named (confidence below min_confidence)": reasons["below_min_confidence"],
            "named": reasons[None],
        }
    ), printed
    # the demo's retained status was cleared: a new subscriber gets nothing retained
    late = subscriber_factory(mosquitto, "#")
    time.sleep(1.0)
    assert [m.topic for m in late.messages if m.retain] == []
    assert (tmp_path / "demo" / "registry.sqlite3").is_file()  # --keep keeps the state


def test_demo_without_a_broker_starts_its_own_and_ignores_the_wards(
    demo_model: Path, mosquitto: Broker, subscriber_factory: Callable[..., Subscriber]
) -> None:
    """The configured (ward) broker answers, yet the demo uses its own: nothing arrives on the ward's."""
    ward = subscriber_factory(mosquitto, "#")
    done = _demo(
        "--synthetic",
        CRYID_MODEL=str(demo_model),
        CRYID_MQTT__HOST="127.0.0.1",
        CRYID_MQTT__PORT=str(mosquitto.port),
    )
    print(done.stdout)
    assert done.returncode == 0, done.stderr
    own = re.search(r"started the demo's own MQTT broker on 127\.0\.0\.1:(\d+)", done.stdout)
    assert own is not None and int(own.group(1)) != mosquitto.port
    assert "EPISODE" in done.stdout and "named WRONG" in done.stdout.strip().splitlines()[-1]
    # generated cries too: the nurse confirms a cry of each of the 3 babies, act 2 is summed up honestly
    act1, nurse, act2 = acts(done.stdout)
    assert len(check_confirmations(act1, nurse)) == 3
    assert "registry: confirmed references for baby1, baby2, baby3" in nurse
    check_summary(act2)
    # act 2's daemon, connecting to the embedded broker after act 1 left retained topics there, got only
    # its own subscriptions' messages (amqtt 0.12 sent it every client's; see demo_mqtt._broker_class)
    assert "unexpected topic" not in done.stderr, done.stderr
    time.sleep(0.5)
    assert ward.messages == []


def test_uncalibrated_model_says_so_and_names_the_fix(onnx_model_dir: Path) -> None:
    done = _demo("--synthetic", "--babies", "2", CRYID_MODEL=str(onnx_model_dir))
    assert done.returncode == 0, done.stderr
    assert "decisions: the model has NO calibration" in done.stdout
    assert f"fix: `cryid model calibrate {onnx_model_dir} --data DIR`" in done.stdout
    assert "cryid model calibrate" in done.stderr  # the daemon's start-up warning
    for line in EPISODE_LINE.findall(done.stdout):
        assert "confidence -" in line and " cos " in line


def test_summary_counts_right_wrong_and_not_named(capsys: pytest.CaptureFixture[str]) -> None:
    truth = [nursery.Truth("a", 0.0, 5.0), nursery.Truth("b", 10.0, 15.0), nursery.Truth(None, 20.0, 25.0)]

    def ep(at: float, baby: str | None, best: str) -> dict[str, object]:
        cands = [
            {"baby_id": best, "score": 0.5, "probability": 0.6},
            {"baby_id": "x", "score": 0.4, "probability": 0.3},
        ]
        return {
            "event_id": str(uuid.uuid4()),
            "kind": "episode",
            "stream_offset_s": at,
            "baby_id": baby,
            "confidence": 0.6 if baby is None else 0.95,
            "candidates": cands,
            "n_expirations": 3,
        }

    events = [
        ep(0.2, "a", "a"),
        ep(3.0, None, "a"),
        ep(10.1, "a", "a"),
        ep(20.5, "b", "b"),
        ep(22.0, None, "b"),
        ep(40.0, None, "a"),  # no one cried there (a false cry): not named, not counted against a baby
    ]
    counts = summary(events, truth)
    out = capsys.readouterr().out
    assert counts == {
        "named right": 1,
        "named wrong": 2,
        "not named": 1,
        "not named (nobody enrolled)": 1,
        "not named (no cry)": 1,
    }
    assert out.count("NAMED WRONG") == 2 and "probably a 0.60, x 0.30" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith(
        "6 episodes: 1 named right, 2 named WRONG, 1 cry of enrolled babies not named, 1 cry of the baby "
        "nobody enrolled not named, 1 other sound not named"
    )
    assert last.endswith("the likeliest candidate of 1 of the 1 unnamed cry of enrolled babies")


def test_describe_says_why_a_cry_was_not_named() -> None:
    """Each unnamed event's line gives its ``reason`` in a few words; an older daemon's event (no reason)
    and a named one give none; a reason this demo does not know yet is printed as sent."""
    cands = [{"baby_id": "a", "score": 0.81, "probability": 0.97, "confirmed": False}]
    ev = {"baby_id": None, "confidence": 0.97, "candidates": cands}
    line = describe(ev | {"reason": "not_confirmed"})
    assert line == "-          not named (no confirmed cry yet)  confidence 0.97  probably a 0.97"
    assert "not named (confidence below min_confidence)" in describe(ev | {"reason": "below_min_confidence"})
    assert "not named (score below min_score)" in describe(ev | {"reason": "below_min_score"})
    assert "not named (margin below min_margin)" in describe(ev | {"reason": "below_min_margin"})
    nobody = describe({"baby_id": None, "confidence": None, "candidates": [], "reason": "no_candidates"})
    assert nobody == "-          not named (no baby enrolled)  confidence -  probably nobody enrolled"
    assert describe(ev | {"reason": "too_loud"}).startswith("-          not named (too_loud)  ")
    assert describe(ev).startswith("-          not named  confidence 0.97")  # an older daemon: no reason
    named = describe({"baby_id": "a", "confidence": 0.97, "candidates": cands, "reason": None})
    assert named.startswith("a          named      confidence 0.97") and "(" not in named.split("  ")[0]


def test_later_cries_split_in_two_parts_that_share_no_cry(dac_dir: Path) -> None:
    """Act 1 and act 2 hear different cries: the first later recording and the rest, or the two sides of
    a single recording cut in a pause of its middle third."""
    one = load_audio(dac_dir / "audio/dev/dac0018/D/dac0018_D_000.flac")
    a, b = nursery.split_later([one])
    assert a.size and b.size and np.array_equal(np.concatenate([a, b]), one)
    assert one.size / 3 <= a.size <= 2 * one.size / 3
    frame = 320  # the cut lies in the quietest 20 ms frame of the middle third
    quiet = np.sqrt(np.mean(np.square(one[a.size - frame // 2 : a.size + frame // 2], dtype=np.float64)))
    loud = np.sqrt(np.mean(np.square(one[one.size // 3 : 2 * one.size // 3], dtype=np.float64)))
    assert quiet < loud / 3
    two = [one[:16000], one[16000:]]
    a, b = nursery.split_later(two)
    assert a is two[0] and np.array_equal(b, two[1])
    with pytest.raises(ValueError, match="too short"):
        nursery.split_later([one[:100]])


def test_demo_broker_option_is_checked() -> None:
    done = _demo("--broker", "no-port:x")
    assert done.returncode == 2 and done.stderr.strip().startswith("cryid: error: --broker 'no-port:x'")


def test_demo_data_option_must_hold_the_data_set(tmp_path: Path) -> None:
    done = _demo("--data", str(tmp_path))
    assert done.returncode == 2 and done.stderr.strip() == (
        f"cryid: error: --data {tmp_path}: no metadata.csv there; "
        "give the donateacry-cc folder or drop --data"
    )
