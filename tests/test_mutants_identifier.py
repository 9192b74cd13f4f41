"""Identifier behaviour that mutation testing showed unchecked (bench/mutation.py daemon/identifier.py).

Public API only: ``Identifier`` built from plain centroids (orthogonal unit vectors, so every score is
exact), ``process`` / ``advance`` / ``flush``, ``set_settings``, ``enrolled`` and ``to_event``. Time is
the sample index of the stream, as in the daemon.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from datetime import datetime, timezone

import numpy as np
import pytest

from cryid.daemon.config import IdentifierSettings
from cryid.daemon.identifier import Identifier
from cryid.models.pipeline import EmbeddedExpiration
from cryid.models.segmenter import Expiration

SR = 16000
DIM = 32
EYE = np.eye(DIM, dtype=np.float32)
ROOM = {name: EYE[k] for k, name in enumerate(("ada", "ben", "cy", "dan", "eve"))}
START = datetime(2024, 5, 1, 8, 0, 0, tzinfo=timezone.utc)


def _item(start: int, end: int, vec: np.ndarray) -> EmbeddedExpiration:
    """An expiration from sample ``start`` to ``end`` whose embedding is ``vec`` (scaled: the
    identifier normalises it)."""
    return EmbeddedExpiration(Expiration(start, end, np.zeros(end - start, np.float32), -20.0), 2.0 * vec)


def _payload(ident_result) -> dict:
    return json.loads(ident_result.to_event(START, SR, "ab" * 32, "ward1").to_json())


def test_candidates_are_the_three_likeliest_of_a_bigger_room() -> None:
    """A room of five: the event lists the three best-scoring babies, best first (the contract's
    ``candidates``: top 3), whatever the room size."""
    ident = Identifier(IdentifierSettings(min_score=0.5, min_margin=0.1), ROOM, SR)
    cry = 0.9 * ROOM["cy"] + 0.4 * ROOM["eve"] + 0.2 * ROOM["ada"] + 0.1 * ROOM["dan"]
    (r,) = ident.process(_item(0, SR, cry))
    assert [c.baby_id for c in r.match.candidates] == ["cy", "eve", "ada"]
    assert r.match.n_candidates == 5
    data = _payload(r)
    assert [c["baby_id"] for c in data["candidates"]] == ["cy", "eve", "ada"]
    assert data["n_candidates"] == 5 and data["baby_id"] == "cy"


def test_a_room_without_babies_gives_an_event_with_no_scores() -> None:
    """Nobody enrolled in the room: the cry is still published, as unknown, with no score, no
    confidence, no candidates and zero candidates counted."""
    ident = Identifier(IdentifierSettings(), {}, SR)
    (r,) = ident.process(_item(0, SR, ROOM["ada"]))
    data = _payload(r)
    assert data["decision"] == "unknown" and data["baby_id"] is None and data["best_baby_id"] is None
    assert data["score"] is None and data["confidence"] is None and data["margin"] is None
    assert data["runner_up"] is None
    assert data["candidates"] == [] and data["n_candidates"] == 0
    (final,) = ident.flush()
    assert _payload(final)["n_candidates"] == 0


def test_results_cannot_be_changed_by_whoever_receives_them() -> None:
    """One result goes to the outbox, the room state and the episode store: none of them can alter it
    for the others."""
    ident = Identifier(IdentifierSettings(min_score=0.5, min_margin=0.1), ROOM, SR)
    (r,) = ident.process(_item(0, SR, ROOM["ben"]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.kind = "episode"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.match.decision = "unknown"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.match.candidates[0].score = 0.0  # type: ignore[misc]


def test_new_thresholds_apply_to_the_next_cry_of_the_same_episode() -> None:
    """A reload (SIGHUP) hands in new thresholds: the open episode continues, decided under them."""
    ident = Identifier(IdentifierSettings(min_score=0.5, min_margin=0.1), ROOM, SR)
    cry = ROOM["ben"] + 0.5 * ROOM["ada"]  # score 0.89, margin 0.45
    (first,) = ident.process(_item(0, SR, cry))
    assert first.match.baby_id == "ben"
    ident.set_settings(IdentifierSettings(min_score=0.95, min_margin=0.1))
    (second,) = ident.process(_item(SR + SR // 10, 2 * SR, cry))
    assert second.episode_id == first.episode_id
    assert (second.match.decision, second.match.baby_id, second.match.best_baby_id) == (
        "unknown",
        None,
        "ben",
    )
    (final,) = ident.flush()
    assert final.match.decision == "unknown" and final.n_expirations == 2


def test_enrolled_lists_the_room_and_follows_a_change_of_babies() -> None:
    ident = Identifier(IdentifierSettings(), {"ben": ROOM["ben"], "ada": ROOM["ada"]}, SR)
    assert sorted(ident.enrolled) == ["ada", "ben"]
    ident.set_centroids({"cy": ROOM["cy"]})
    assert list(ident.enrolled) == ["cy"]


def test_bad_arguments_are_refused_naming_the_value() -> None:
    with pytest.raises(ValueError, match=r"^sample_rate must be positive, got 0$"):
        Identifier(IdentifierSettings(), ROOM, sample_rate=0)
    with pytest.raises(ValueError, match=r"^settle_samples must be >= 0, got -1$"):
        Identifier(IdentifierSettings(), ROOM, SR, settle_samples=-1)
    ident = Identifier(IdentifierSettings(), ROOM, SR)
    with pytest.raises(ValueError, match=r"^expiration ends \(16000\) before it starts \(16000\)$"):
        ident.process(_item(SR, SR, ROOM["ada"]))  # no length at all
    assert ident.flush() == []  # the refused expiration opened no episode


def test_episode_gap_is_counted_in_16_khz_samples_by_default_and_is_inclusive() -> None:
    """Without a sample rate the stream is 16 kHz. Two expirations exactly ``episode_gap_s`` apart
    are one episode; one sample further apart, two."""
    settings = IdentifierSettings(episode_gap_s=1.0)
    together = Identifier(settings, ROOM)
    (a,) = together.process(_item(0, SR, ROOM["ada"]))
    (b,) = together.process(_item(2 * SR, 3 * SR, ROOM["ada"]))  # 16000 samples after the first ended
    assert b.episode_id == a.episode_id and b.n_expirations == 2
    apart = Identifier(settings, ROOM)
    (a,) = apart.process(_item(0, SR, ROOM["ada"]))
    closed, b = apart.process(_item(2 * SR + 1, 3 * SR, ROOM["ada"]))
    assert (closed.kind, closed.episode_id, closed.n_expirations) == ("episode", a.episode_id, 1)
    assert b.episode_id != a.episode_id and b.n_expirations == 1


def test_an_episode_may_last_exactly_max_episode_s() -> None:
    """Back-to-back one-second expirations with ``max_episode_s`` 10: the tenth ends exactly 10 s after
    the episode began and still belongs to it; the eleventh starts a new episode."""
    ident = Identifier(IdentifierSettings(episode_gap_s=2.0, max_episode_s=10.0), ROOM, SR)
    out = []
    for k in range(11):
        out += ident.process(_item(k * SR, (k + 1) * SR, ROOM["dan"]))
    episodes = [r for r in out if r.kind == "episode"]
    assert len(episodes) == 1
    assert (episodes[0].start_sample, episodes[0].end_sample, episodes[0].n_expirations) == (0, 10 * SR, 10)
    assert out[-1].kind == "expiration" and out[-1].n_expirations == 1


def test_advance_closes_the_episode_one_sample_after_the_gap_by_default() -> None:
    """Without ``settle_samples`` an episode closes as soon as the stream is more than
    ``episode_gap_s`` past its last expiration, not earlier."""
    ident = Identifier(IdentifierSettings(episode_gap_s=1.0), ROOM, SR)
    ident.process(_item(0, SR, ROOM["eve"]))
    assert ident.advance(2 * SR) == []  # exactly the gap: a cry starting now would still join
    (closed,) = ident.advance(2 * SR + 1)
    assert (closed.kind, closed.n_expirations, closed.match.best_baby_id) == ("episode", 1, "eve")
    assert ident.advance(10 * SR) == [] and ident.flush() == []


def test_an_episode_reports_the_loudest_of_its_expirations_and_logs_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The episode's level is the loudest expiration's (each new episode starts from nothing, not
    from the last one's); the closed episode is logged in one line with its decision."""
    caplog.set_level(logging.INFO, logger="cryid.daemon.identifier")
    ident = Identifier(IdentifierSettings(min_score=0.5, min_margin=0.1, episode_gap_s=1.0), ROOM, SR)
    results = []
    for start_s, level in ((0, -31.5), (1.2, -18.25), (2.4, -40.0)):
        start = round(start_s * SR)
        exp = Expiration(start, start + SR, np.zeros(SR, np.float32), level)
        results += ident.process(EmbeddedExpiration(exp, ROOM["ben"]))
    later = Expiration(20 * SR, 21 * SR, np.zeros(SR, np.float32), -50.0)
    first, new = ident.process(EmbeddedExpiration(later, ROOM["ben"]))
    assert new.kind == "expiration" and new.episode_id != first.episode_id
    assert (first.kind, first.n_expirations, first.level_dbfs) == ("episode", 3, -18.25)
    assert _payload(first)["level_dbfs"] == -18.25
    (second,) = ident.flush()
    assert (second.n_expirations, second.level_dbfs) == (1, -50.0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("episode ")]
    assert lines[0] == (
        f"episode {first.episode_id[:8]}: identified ben (confidence None, score 1.0, 3 expirations, "
        "5 candidates)"
    )
    assert len(lines) == 2
