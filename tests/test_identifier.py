"""The identifier stage: decisions, runner-up and margin, episodes, payload conversion."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
import pytest

from cryid.daemon.config import IdentifierSettings
from cryid.daemon.events import CryEvent
from cryid.daemon.identifier import Identifier
from cryid.models.pipeline import EmbeddedExpiration
from cryid.models.segmenter import Expiration

SR = 16000
RNG = np.random.default_rng(7)
_VECS = RNG.normal(size=(3, 64))
BASIS = {b: v / np.linalg.norm(v) for b, v in zip(("ada", "ben", "cy"), _VECS, strict=True)}


def _item(start_s: float, dur_s: float, vec: np.ndarray, level: float = -20.0) -> EmbeddedExpiration:
    start = round(start_s * SR)
    end = start + round(dur_s * SR)
    exp = Expiration(start, end, np.zeros(end - start, np.float32), level)
    return EmbeddedExpiration(exp, (vec * 3.0).astype(np.float32))  # not normalised on purpose


def _noisy(baby: str, noise: float) -> np.ndarray:
    return BASIS[baby] + noise * RNG.normal(size=64) / 8.0


def _ident(**kw: float) -> Identifier:
    return Identifier(IdentifierSettings(min_score=0.6, min_margin=0.1, **kw), dict(BASIS), SR)


def test_identifies_the_right_baby_with_runner_up_and_margin() -> None:
    ident = _ident()
    out = ident.process(_item(1.0, 0.8, _noisy("ben", 0.3)))
    assert len(out) == 1
    r = out[0]
    assert r.kind == "expiration" and r.match.decision == "identified" and r.match.baby_id == "ben"
    assert r.match.runner_up_id in {"ada", "cy"}
    assert r.match.margin == pytest.approx(r.match.score - r.match.runner_up_score, abs=1e-4)
    assert r.n_expirations == 1


def test_unknown_cry_names_the_best_match_but_no_baby() -> None:
    ident = _ident()
    stranger = RNG.normal(size=64)
    r = ident.process(_item(0.0, 0.6, stranger))[0]
    assert r.match.decision == "unknown"
    assert r.match.baby_id is None
    assert r.match.best_baby_id in BASIS
    assert r.match.score < 0.6


def test_margin_threshold_rejects_a_cry_between_two_babies() -> None:
    ident = _ident()
    between = BASIS["ada"] + BASIS["ben"]
    r = ident.process(_item(0.0, 0.6, between))[0]
    assert r.match.score >= 0.6  # close enough to both ...
    assert r.match.margin < 0.1  # ... but not to one
    assert r.match.decision == "unknown"


def test_episode_groups_close_expirations_and_firms_up() -> None:
    ident = Identifier(IdentifierSettings(min_score=0.6, min_margin=0.1, episode_gap_s=2.0), dict(BASIS), SR)
    results = []
    t = 0.0
    for i in range(6):
        noise = 3.0 if i == 0 else 1.2  # the first expiration alone is too noisy to decide
        results += ident.process(_item(t, 0.7, _noisy("cy", noise)))
        results += ident.advance(round((t + 0.7) * SR))
        t += 1.2
    assert [r.kind for r in results] == ["expiration"] * 6
    assert [r.n_expirations for r in results] == [1, 2, 3, 4, 5, 6]
    assert len({r.episode_id for r in results}) == 1
    assert results[0].match.decision == "unknown"
    assert results[-1].match.decision == "identified" and results[-1].match.baby_id == "cy"
    # the next cry comes after a long pause: the episode is closed first, then a new one starts
    nxt = ident.process(_item(t + 5.0, 0.7, _noisy("ada", 0.3)))
    assert [r.kind for r in nxt] == ["episode", "expiration"]
    ep = nxt[0]
    assert ep.match.baby_id == "cy" and ep.n_expirations == 6
    assert ep.start_sample == 0 and ep.end_sample == round((t - 1.2 + 0.7) * SR)
    assert nxt[1].episode_id != ep.episode_id and nxt[1].match.baby_id == "ada"


def test_advance_closes_an_episode_only_after_gap_and_settle_time() -> None:
    ident = Identifier(IdentifierSettings(episode_gap_s=1.0), dict(BASIS), SR, settle_samples=SR // 2)
    ident.process(_item(0.0, 1.0, _noisy("ada", 0.3)))
    assert ident.advance(round(2.4 * SR)) == []  # 1.4 s after the end: a cry may still be in the segmenter
    closed = ident.advance(round(2.6 * SR))
    assert [r.kind for r in closed] == ["episode"]
    assert ident.flush() == []


def test_long_crying_is_split_into_episodes_of_max_length() -> None:
    ident = Identifier(IdentifierSettings(episode_gap_s=2.0, max_episode_s=10.0), dict(BASIS), SR)
    kinds = []
    for i in range(20):
        kinds += [r.kind for r in ident.process(_item(i * 1.0, 0.8, _noisy("ben", 0.3)))]
    kinds += [r.kind for r in ident.flush()]
    assert kinds.count("episode") == 2
    assert kinds.count("expiration") == 20


def test_no_enrolled_babies_gives_unknown_without_scores() -> None:
    ident = Identifier(IdentifierSettings(), {}, SR)
    r = ident.process(_item(0.0, 0.5, _noisy("ada", 0.3)))[0]
    assert r.match.decision == "unknown" and r.match.score is None and r.match.best_baby_id is None


def test_single_enrolled_baby_has_no_runner_up() -> None:
    ident = Identifier(IdentifierSettings(min_score=0.6), {"ada": BASIS["ada"]}, SR)
    r = ident.process(_item(0.0, 0.5, _noisy("ada", 0.3)))[0]
    assert r.match.runner_up_id is None and r.match.margin == r.match.score
    assert r.match.decision == "identified"


def test_wrong_embedding_size_asks_for_reenrollment() -> None:
    ident = _ident()
    with pytest.raises(ValueError, match="re-enroll"):
        ident.process(_item(0.0, 0.5, np.ones(32)))


def test_set_centroids_takes_effect_for_the_next_expiration() -> None:
    ident = Identifier(IdentifierSettings(min_score=0.6, min_margin=0.1), {"ada": BASIS["ada"]}, SR)
    assert ident.process(_item(0.0, 0.5, _noisy("ben", 0.3)))[0].match.decision == "unknown"
    ident.set_centroids(dict(BASIS))
    assert ident.process(_item(0.8, 0.5, _noisy("ben", 0.3)))[0].match.baby_id == "ben"


def test_event_payload_has_the_contract_fields_in_utc() -> None:
    ident = _ident()
    r = ident.process(_item(12.5, 0.75, _noisy("ada", 0.3), level=-18.04))[0]
    start = datetime(2024, 5, 1, 8, 0, 0, tzinfo=timezone.utc)
    ev = r.to_event(start, SR, "ab" * 32, "ward1")
    data = json.loads(ev.to_json())
    for key in (
        "event_id", "kind", "decision", "baby_id", "score", "runner_up", "margin", "started_at",
        "ended_at", "stream_offset_s", "n_expirations", "model_sha256",
    ):
        assert key in data
    assert data["stream_offset_s"] == 12.5 and data["duration_s"] == 0.75
    assert data["started_at"] == "2024-05-01T08:00:12.500000Z"
    assert data["ended_at"] == "2024-05-01T08:00:13.250000Z"
    assert data["runner_up"]["baby_id"] in {"ben", "cy"}
    assert CryEvent.model_validate_json(ev.to_json()) == ev
