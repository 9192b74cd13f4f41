"""The identifier stage: calibrated decisions, expert overrides, the uncalibrated fallback, runner-up and
margin, candidates, episodes (and their embeddings), payload conversion.

The calibration is fitted with ``fit_calibration`` on generated rooms of 2-8 babies in the same 64-d
space as the test babies (noisy cries of enrolled babies and cries of babies nobody enrolled)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
import pytest

from cryid.daemon.config import IdentifierSettings
from cryid.daemon.events import SCHEMA_VERSION, CryEvent
from cryid.daemon.identifier import Identifier
from cryid.models.calibration import Calibration, fit_calibration
from cryid.models.pipeline import EmbeddedExpiration
from cryid.models.scoring import ReferenceSet, l2_normalize
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


def _fit_calibration(seed: int = 11) -> Calibration:
    """Rooms of 2-8 babies who sound alike to a varying degree (a shared component: cosines between
    babies of 0 to about 0.9); a quarter of the cries come from a baby nobody enrolled."""
    rng = np.random.default_rng(seed)
    best, margin, n_cands, correct, rows, truth = [], [], [], [], [], []
    for _ in range(1500):
        n = int(rng.integers(2, 9))
        shared = float(rng.uniform(0.0, 3.0)) * l2_normalize(rng.normal(size=64))
        voices = l2_normalize(rng.normal(size=(n + 1, 64))) + shared
        refs = ReferenceSet({f"b{i}": v for i, v in enumerate(voices[:n])})
        stranger = rng.random() < 0.25
        k = int(rng.integers(n))
        base = voices[n] if stranger else voices[k]
        q = l2_normalize(base) + float(rng.uniform(0.5, 3.0)) * rng.normal(size=64) / 8.0
        sc = refs.scores(q)
        order = np.argsort(-sc)
        best.append(float(sc[order[0]]))
        margin.append(float(sc[order[0]] - sc[order[1]]))
        n_cands.append(n)
        correct.append((not stranger) and int(order[0]) == k)
        if not stranger:
            rows.append(sc)
            truth.append(k)
    return fit_calibration(
        np.array(best),
        np.array(margin),
        np.array(n_cands),
        np.array(correct),
        rows,
        truth,
        data="generated rooms (tests/test_identifier.py)",
    )


CAL = _fit_calibration()


def _calibrated(babies: dict[str, np.ndarray] | None = None, **kw: float | None) -> Identifier:
    """No baby here has a confirmed cry, so ``min_confidence`` is also given as the threshold for babies
    without one (whose default is "never"); the split itself is tested below."""
    if "min_confidence" in kw:
        kw.setdefault("min_confidence_unconfirmed", kw["min_confidence"])
    settings = IdentifierSettings(**kw)  # type: ignore[arg-type]
    return Identifier(settings, dict(BASIS if babies is None else babies), SR, calibration=CAL)


def test_a_baby_without_a_confirmed_cry_is_named_only_at_min_confidence_unconfirmed() -> None:
    """Default: never from birth recordings alone (candidates still listed); once a nurse has confirmed a
    cry of the best baby, min_confidence applies; min_confidence_unconfirmed < 1 names unconfirmed babies
    from that value on (inclusive)."""
    q = _noisy("ben", 0.3)
    birth = _calibrated(min_confidence=1e-6, min_confidence_unconfirmed=1.0).match(q)
    assert birth.decision == "unknown" and birth.baby_id is None and birth.best_baby_id == "ben"
    assert birth.confidence is not None and birth.confidence > 0.5 and birth.candidates[0].baby_id == "ben"
    assert IdentifierSettings().min_confidence_unconfirmed == 1.0  # the shipped default: never
    refs = ReferenceSet(dict(BASIS), {"ben": BASIS["ben"]})
    ident = Identifier(IdentifierSettings(min_confidence=1e-6), refs, SR, calibration=CAL)
    confirmed = ident.match(q)
    assert (confirmed.decision, confirmed.baby_id) == ("identified", "ben")
    other = ident.match(_noisy("ada", 0.3))  # ada has no confirmed cry: the default still refuses her
    assert other.best_baby_id == "ada" and other.decision == "unknown"
    at = _calibrated(min_confidence=1.0, min_confidence_unconfirmed=birth.confidence).match(q)
    assert (at.decision, at.baby_id) == ("identified", "ben")
    above = float(np.nextafter(birth.confidence, 2.0))
    assert _calibrated(min_confidence=1e-6, min_confidence_unconfirmed=above).match(q).decision == "unknown"


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
        "event_id",
        "kind",
        "decision",
        "baby_id",
        "score",
        "runner_up",
        "margin",
        "started_at",
        "ended_at",
        "stream_offset_s",
        "n_expirations",
        "model_sha256",
    ):
        assert key in data
    assert data["stream_offset_s"] == 12.5 and data["duration_s"] == 0.75
    assert data["started_at"] == "2024-05-01T08:00:12.500000Z"
    assert data["ended_at"] == "2024-05-01T08:00:13.250000Z"
    assert data["runner_up"]["baby_id"] in {"ben", "cy"}
    assert CryEvent.model_validate_json(ev.to_json()) == ev


# calibrated decisions ---------------------------------------------------------------------------
def test_fixture_calibration_is_sensible() -> None:
    """More similar and more separated is more likely right."""
    assert CAL.confidence(0.9, 0.5, 3) > CAL.confidence(0.5, 0.1, 3)
    assert CAL.confidence(0.7, 0.5, 3) > CAL.confidence(0.7, 0.05, 3)


def test_calibrated_decision_names_a_clear_cry_with_its_confidence_and_candidates() -> None:
    ident = _calibrated(min_confidence=0.9)
    r = ident.process(_item(1.0, 0.8, _noisy("ben", 0.3)))[0]
    m = r.match
    assert m.decision == "identified" and m.baby_id == "ben"
    assert m.n_candidates == 3
    assert m.confidence == CAL.confidence(m.score, m.margin, 3) and m.confidence >= 0.9
    assert m.candidates[0].baby_id == "ben" and len(m.candidates) == 3
    assert m.candidates[0].probability == m.confidence
    assert sum(c.probability for c in m.candidates) == pytest.approx(1.0, abs=1e-9)
    ev = json.loads(r.to_event(datetime.now(timezone.utc), SR, "ab" * 32, "ward1").to_json())
    assert ev["schema_version"] == SCHEMA_VERSION == 2
    assert ev["confidence"] == round(m.confidence, 5) and ev["n_candidates"] == 3
    assert [c["baby_id"] for c in ev["candidates"]] == [c.baby_id for c in m.candidates]
    assert all(set(c) == {"baby_id", "score", "probability", "confirmed"} for c in ev["candidates"])
    assert not any(c["confirmed"] for c in ev["candidates"]) and ev["reason"] is None


def test_min_confidence_boundary_is_inclusive() -> None:
    """Named at exactly min_confidence, not named just above it (>=, not >)."""
    q = _noisy("cy", 1.0)
    conf = _calibrated().match(q).confidence
    assert conf is not None and 0.0 < conf < 1.0
    at = _calibrated(min_confidence=conf).match(q)
    above = _calibrated(min_confidence=float(np.nextafter(conf, 2.0))).match(q)
    assert at.decision == "identified" and at.baby_id == "cy"
    assert above.decision == "unknown" and above.baby_id is None and above.best_baby_id == "cy"


@pytest.mark.parametrize("override", ["min_score", "min_margin"])
def test_expert_overrides_must_also_be_met_inclusively(override: str) -> None:
    q = _noisy("ada", 0.5)
    m = _calibrated(min_confidence=1e-6).match(q)
    value = m.score if override == "min_score" else m.margin
    assert _calibrated(min_confidence=1e-6, **{override: value}).match(q).decision == "identified"
    above = float(np.nextafter(value, 2.0))
    assert _calibrated(min_confidence=1e-6, **{override: above}).match(q).decision == "unknown"
    # the override does not replace the confidence: a high min_confidence still refuses
    lenient = -0.5 if override == "min_score" else 0.0
    strict = _calibrated(min_confidence=float(np.nextafter(m.confidence, 2.0)), **{override: lenient})
    assert strict.match(q).decision == "unknown"


def test_unknown_cry_still_lists_the_likeliest_candidates() -> None:
    """A cry between two babies is not named, but the nurse hears "probably ada or ben"."""
    ident = _calibrated(min_confidence=0.9)
    r = ident.process(_item(0.0, 0.6, BASIS["ada"] + BASIS["ben"]))[0]
    m = r.match
    assert m.decision == "unknown" and m.confidence is not None and m.confidence < 0.9
    assert {c.baby_id for c in m.candidates[:2]} == {"ada", "ben"}
    ev = r.to_event(datetime.now(timezone.utc), SR, "ab" * 32, "ward1")
    assert ev.baby_id is None and {c.baby_id for c in ev.candidates[:2]} == {"ada", "ben"}
    assert all(c.probability is not None for c in ev.candidates)


def test_confidence_accounts_for_the_number_of_candidates() -> None:
    """The room's candidate count goes into the calibration: with a map that is less sure in bigger rooms
    (negative log-count weight), the same best score and margin give a lower confidence among 8 babies."""
    cal = Calibration(coef=(8.0, 6.0, -1.5), intercept=-2.0)
    rng = np.random.default_rng(3)
    far = {f"x{i}": -(BASIS["ada"] + 0.1 * v / 8) for i, v in enumerate(rng.normal(size=(6, 64)))}
    q = _noisy("ada", 1.0)
    two = {"ada": BASIS["ada"], "ben": BASIS["ben"]}
    small = Identifier(IdentifierSettings(), two, SR, calibration=cal).match(q)
    big = Identifier(IdentifierSettings(), {**two, **far}, SR, calibration=cal).match(q)
    assert (small.n_candidates, big.n_candidates) == (2, 8)
    # the far babies change neither (up to float32 rounding: BLAS sums a 2-row and an 8-row product in
    # different orders on some CPUs, e.g. AVX2-only ones)
    assert (small.score, small.margin) == pytest.approx((big.score, big.margin), abs=1e-6)
    assert small.confidence == cal.confidence(small.score, small.margin, 2)
    assert big.confidence == cal.confidence(big.score, big.margin, 8)
    assert big.confidence < small.confidence
    for ident in (_calibrated(two), _calibrated({**two, **far})):  # the fitted map gets the count too
        m = ident.match(q)
        assert m.confidence == CAL.confidence(m.score, m.margin, m.n_candidates)


def test_provisional_decisions_use_the_whole_episode_so_far() -> None:
    """Second expiration: scored on the re-normalised mean of both, not on the last one alone."""
    ident = _calibrated(min_confidence=0.9)
    first = ident.process(_item(0.0, 0.7, BASIS["ada"]))[0]
    second = ident.process(_item(1.0, 0.7, BASIS["ben"]))[0]
    assert first.match.baby_id == "ada" and second.episode_id == first.episode_id
    pooled = l2_normalize(BASIS["ada"] + BASIS["ben"])
    want = {b: float(np.dot(pooled, v)) for b, v in BASIS.items()}
    got = {c.baby_id: c.score for c in second.match.candidates}
    assert got == pytest.approx(want, abs=1e-5)
    assert second.match.score < 0.9  # the last expiration alone would score 1.0 for ben
    assert second.match.decision == "unknown"  # ada and ben are equally likely: nobody is named


def test_episode_result_carries_its_expiration_embeddings() -> None:
    ident = _calibrated()
    vecs = [_noisy("ben", 0.5) for _ in range(3)]
    for i, v in enumerate(vecs):
        ident.process(_item(i * 1.0, 0.7, v))
    (ep,) = ident.flush()
    assert ep.kind == "episode" and ep.embeddings is not None
    assert ep.embeddings.dtype == np.float32 and ep.embeddings.shape == (3, 64)
    np.testing.assert_allclose(ep.embeddings, l2_normalize(np.stack(vecs)), atol=1e-6)
    provisional = _calibrated().process(_item(0.0, 0.7, vecs[0]))[0]
    assert provisional.embeddings is None


# uncalibrated models ----------------------------------------------------------------------------
def test_uncalibrated_model_decides_on_fallback_thresholds_without_confidence() -> None:
    q = _noisy("ben", 0.5)
    probe = Identifier(IdentifierSettings(), dict(BASIS), SR).match(q)
    assert probe.confidence is None and all(c.probability is None for c in probe.candidates)
    assert probe.candidates[0].baby_id == "ben"
    at = IdentifierSettings(fallback_min_score=probe.score, fallback_min_margin=probe.margin)
    assert Identifier(at, dict(BASIS), SR).match(q).decision == "identified"
    above = IdentifierSettings(fallback_min_score=float(np.nextafter(probe.score, 2.0)))
    assert Identifier(above, dict(BASIS), SR).match(q).decision == "unknown"
    # min_score, when set, replaces the fallback (and min_confidence is not used without calibration)
    low = IdentifierSettings(min_score=-1.0, min_margin=0.0, fallback_min_score=1.0, min_confidence=1.0)
    assert Identifier(low, dict(BASIS), SR).match(q).decision == "identified"
    ev = (
        Identifier(IdentifierSettings(), dict(BASIS), SR)
        .process(_item(0.0, 0.5, q))[0]
        .to_event(datetime.now(timezone.utc), SR, "ab" * 32, "ward1")
    )
    assert ev.confidence is None and ev.candidates[0].probability is None


def test_settings_defaults_and_bounds() -> None:
    s = IdentifierSettings()
    assert s.min_score is None and s.min_margin is None and 0.0 < s.min_confidence <= 1.0
    for bad in ({"min_confidence": 0.0}, {"min_confidence": 1.5}, {"min_score": 2.0}, {"min_margin": -0.1}):
        with pytest.raises(ValueError):
            IdentifierSettings(**bad)  # type: ignore[arg-type]
