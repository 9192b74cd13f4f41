"""Why a cry was not named, and which candidates a nurse has confirmed a cry of: the event's ``reason`` and
``candidates[].confirmed``.

Real parts: the shipped model (models/default) and its calibration, dev babies of donateacry-cc enrolled
from their birth (B) recordings into a real SQLite registry, episodes kept from their discharge (D)
recordings through the daemon's segmenter and embedder, nurse confirmations through the enrollment
library, and the references read back from the registry as the daemon reads them.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cryid.daemon.config import IdentifierSettings
from cryid.daemon.events import REASONS, CryEvent
from cryid.daemon.identifier import Identifier, Match
from cryid.enrollment import feedback
from cryid.enrollment.config import RegistrySettings
from cryid.enrollment.registry import Registry
from cryid.models.calibration import Calibration
from cryid.models.config import DEFAULT_MODEL_DIR
from cryid.models.embedder import Embedder
from cryid.models.scoring import ReferenceSet, l2_normalize
from tests.fixtures.ward import enroll_room, files, keep

ROOM = "nursery"
SR = 16000


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def calibration(embedder: Embedder) -> Calibration:
    cal = embedder.manifest.calibration
    assert cal is not None, "the shipped model has no calibration: run `cryid model calibrate models/default`"
    return cal


@pytest.fixture(scope="module")
def room(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder, dac_dir: Path) -> dict[str, Any]:
    """A registry of 3 dev babies (room nursery) and, for each, one kept episode of a D recording."""
    state = tmp_path_factory.mktemp("confirmed") / "state"
    with Registry.open(state) as reg:
        babies = enroll_room(reg, embedder, dac_dir, ROOM, n=3)
        assert len(babies) == 3
        episodes = {b: keep(reg, embedder, files(dac_dir, b, "D")[0], ROOM) for b in babies}
    return {"state": state, "babies": babies, "episodes": episodes}


def _references(reg: Registry, embedder: Embedder, calibration: Calibration) -> ReferenceSet:
    """The room's references as the daemon builds them from the registry (service._poll_registry)."""
    birth, confirmed = reg.references(embedder.sha256, ROOM, embedder.dim)
    return ReferenceSet(birth, confirmed, calibration.confirmed_weight)


def _query(reg: Registry, episode_id: str) -> np.ndarray:
    """The episode's pooled embedding, as the identifier pools an episode's expirations."""
    vectors = reg.episode_vectors(episode_id)
    assert vectors is not None and vectors.shape[0] >= 1
    return np.mean(l2_normalize(vectors), axis=0)


def _payload(ident: Identifier, match: Match) -> dict[str, Any]:
    """The match as an event payload (through to_event, the daemon's conversion)."""
    from cryid.daemon.identifier import Identification

    r = Identification("episode", "e" * 8, "p" * 8, match, 0, SR, 1, -20.0)
    ev = r.to_event(datetime(2024, 5, 1, tzinfo=timezone.utc), SR, "ab" * 32, ROOM)
    data = json.loads(ev.to_json())
    assert CryEvent.model_validate(data) == ev
    return data


def _flags(data: dict[str, Any]) -> dict[str, bool]:
    return {c["baby_id"]: c["confirmed"] for c in data["candidates"]}


def test_confirmed_flag_follows_the_registry(
    room: dict[str, Any], embedder: Embedder, calibration: Calibration, tmp_path: Path
) -> None:
    """No candidate is confirmed from birth recordings alone; once a nurse confirms a cry as baby X, X's
    candidate entry says so (and no other's); after the confirmation is undone, X's says no again."""
    babies, episodes = room["babies"], room["episodes"]
    settings = IdentifierSettings()  # the shipped defaults
    with Registry.open(room["state"]) as reg:
        q = _query(reg, episodes[babies[0]])
        ident = Identifier(settings, _references(reg, embedder, calibration), SR, calibration=calibration)
        before = _payload(ident, ident.match(q))
        assert len(before["candidates"]) == 3 and set(_flags(before)) == set(babies)
        assert _flags(before) == dict.fromkeys(babies, False)
        # the shipped default never names a baby without a confirmed cry
        assert before["baby_id"] is None and before["reason"] in ("not_confirmed", "below_min_confidence")

        taught = babies[1]  # a cry of another baby's confirmed as this one's: the flag follows the registry
        done = feedback.confirm(reg, episodes[taught], taught, RegistrySettings(), by="Nurse Joy")
        ident.set_references(_references(reg, embedder, calibration))
        after = _payload(ident, ident.match(q))
        assert _flags(after) == {b: b == taught for b in babies}, after["candidates"]

        feedback.undo(reg, done.confirmation_id, by="Nurse Joy")
        ident.set_references(_references(reg, embedder, calibration))
        undone = _payload(ident, ident.match(q))
        assert _flags(undone) == dict.fromkeys(babies, False)
        # the undone registry scores as before the confirmation (up to float32 rounding of the payload)
        assert [c["baby_id"] for c in undone["candidates"]] == [c["baby_id"] for c in before["candidates"]]
        assert undone["confidence"] == pytest.approx(before["confidence"], abs=1e-5)


def test_reason_for_each_branch_of_the_decision(
    room: dict[str, Any], embedder: Embedder, calibration: Calibration
) -> None:
    """Each way the identifier can decide not to name a baby gives its own ``reason``; a named cry none.
    Thresholds are set at (named) or just above (not named) the real cry's own confidence, score and
    margin, so each branch is reached whatever the model's accuracy."""
    babies, episodes = room["babies"], room["episodes"]
    with Registry.open(room["state"]) as reg:
        q = _query(reg, episodes[babies[0]])
        refs = _references(reg, embedder, calibration)

    def decide(cal: Calibration | None = calibration, refs: ReferenceSet = refs, **kw: Any) -> dict[str, Any]:
        ident = Identifier(IdentifierSettings(**kw), refs, SR, calibration=cal)
        m = ident.match(q)
        data = _payload(ident, m)
        assert (data["reason"] is None) == (data["decision"] == "identified") == (data["baby_id"] is not None)
        assert data["reason"] == m.reason
        return data

    first = decide()
    assert not _flags(first)[first["best_baby_id"]]  # birth recordings only
    # the unrounded figures (the payload rounds them to 5 decimals)
    m = Identifier(IdentifierSettings(), refs, SR, calibration=calibration).match(q)
    conf, score, margin = m.confidence, m.score, m.margin
    assert conf is not None and score is not None and margin is not None and 0.0 < conf < 1.0
    above = float(np.nextafter(conf, 2.0))
    # nobody enrolled (for this model, in this room)
    assert decide(refs=ReferenceSet({}))["reason"] == "no_candidates"
    # named once the threshold that applies (the unconfirmed one) is met
    assert decide(min_confidence=conf, min_confidence_unconfirmed=conf)["reason"] is None
    # min_confidence met, but the best candidate has no confirmed cry: the shipped default (never) ...
    assert decide(min_confidence=conf)["reason"] == "not_confirmed"
    # ... or a min_confidence_unconfirmed above its confidence
    assert decide(min_confidence=conf, min_confidence_unconfirmed=above)["reason"] == "not_confirmed"
    # below min_confidence: confirming alone would not name it
    assert decide(min_confidence=above)["reason"] == "below_min_confidence"
    assert decide(min_confidence=above, min_confidence_unconfirmed=above)["reason"] == "below_min_confidence"
    # the expert overrides, at and just above the cry's own score and margin
    named = {"min_confidence": conf, "min_confidence_unconfirmed": conf}
    assert decide(**named, min_score=score, min_margin=margin)["reason"] is None
    assert decide(**named, min_score=float(np.nextafter(score, 2.0)))["reason"] == "below_min_score"
    assert decide(**named, min_margin=float(np.nextafter(margin, 3.0)))["reason"] == "below_min_margin"
    # an override not met is the reason even when the baby is also unconfirmed: confirming is not enough
    assert (
        decide(min_confidence=conf, min_score=float(np.nextafter(score, 2.0)))["reason"] == "below_min_score"
    )
    # an uncalibrated model: the cosine thresholds
    assert decide(cal=None, min_score=score, min_margin=margin)["reason"] is None
    assert decide(cal=None, min_score=float(np.nextafter(score, 2.0)))["reason"] == "below_min_score"
    assert decide(cal=None, min_score=-1.0, min_margin=float(np.nextafter(margin, 3.0)))["reason"] == (
        "below_min_margin"
    )
    # every reason the payload can carry was reached above
    assert set(REASONS) == {
        "no_candidates", "not_confirmed", "below_min_confidence", "below_min_score", "below_min_margin"
    }  # fmt: skip


def test_confirmed_best_candidate_is_held_to_min_confidence(
    room: dict[str, Any], embedder: Embedder, calibration: Calibration, tmp_path: Path
) -> None:
    """The nurse confirms the cry as its baby's and the same cry is heard again: its baby, now confirmed,
    is named at min_confidence and not above it (``below_min_confidence``), never ``not_confirmed``."""
    babies, episodes = room["babies"], room["episodes"]
    state = tmp_path / "state"  # a copy: the module's registry stays without confirmations
    shutil.copytree(room["state"], state)
    with Registry.open(state) as reg:
        q = _query(reg, episodes[babies[0]])
        feedback.confirm(reg, episodes[babies[0]], babies[0], RegistrySettings(), by="Nurse Joy")
        refs = _references(reg, embedder, calibration)

    def decide(**kw: float) -> Match:
        return Identifier(IdentifierSettings(**kw), refs, SR, calibration=calibration).match(q)

    m = decide()
    assert m.best_baby_id == babies[0] and [c.confirmed for c in m.candidates] == [True, False, False]
    assert m.confidence is not None and m.confidence < 1.0
    assert (m.decision, m.reason) == (
        ("identified", None) if m.confidence >= 0.94 else ("unknown", "below_min_confidence")
    )
    at = decide(min_confidence=m.confidence)
    assert (at.decision, at.baby_id, at.reason) == ("identified", babies[0], None)
    above = decide(min_confidence=float(np.nextafter(m.confidence, 2.0)))
    assert (above.decision, above.baby_id, above.reason) == ("unknown", None, "below_min_confidence")


def test_payload_of_an_older_daemon_still_reads() -> None:
    """``reason`` and ``candidates[].confirmed`` are optional additions to schema version 2: an event
    without them (an older daemon, or one kept in the registry before) validates, as not named for no
    stated reason and with no candidate known to be confirmed."""
    t = datetime(2024, 5, 1, tzinfo=timezone.utc)
    ev = CryEvent(
        event_id="e", episode_id="p", kind="episode", decision="unknown", baby_id=None, best_baby_id="ada",
        score=0.5, runner_up=None, margin=0.5, confidence=0.97,
        candidates=[{"baby_id": "ada", "score": 0.5, "probability": 0.97}], n_candidates=1,
        started_at=t, ended_at=t, stream_offset_s=0.0, duration_s=0.0, n_expirations=1, level_dbfs=-20.0,
        model_sha256="ab" * 32, room=ROOM,
    )  # fmt: skip
    old = json.loads(ev.to_json())
    del old["reason"], old["candidates"][0]["confirmed"]
    back = CryEvent.model_validate_json(json.dumps(old))
    assert back.reason is None and back.candidates[0].confirmed is False
    with pytest.raises(ValueError, match="reason"):
        CryEvent.model_validate_json(json.dumps(old | {"reason": "too_loud"}))
