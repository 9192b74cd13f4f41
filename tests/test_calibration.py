"""Calibration and ward rooms: known answers on generated scores and embeddings, and ``cryid model
calibrate`` through the real CLI on a real ONNX model (the tests' seeded ECAPA-TDNN, C=128) and the
generated CryCeleb-layout set."""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cryid.daemon.cli import main
from cryid.daemon.config import IdentifierSettings
from cryid.models.calibration import (
    FEATURES,
    LEGACY_FEATURES,
    Calibration,
    fit_calibration,
    fit_logistic,
    reliability,
)
from cryid.models.decision import NamingRule
from cryid.models.evaluation.ward import (
    WardData,
    coverage,
    draw_rooms,
    named_mask,
    query_confidences,
    score_rooms,
    top_k,
    wrong_rate,
)
from cryid.models.manifest import load_manifest


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def test_logistic_fit_recovers_a_known_model_and_is_calibrated() -> None:
    rng = np.random.default_rng(3)
    n = 40_000
    best = rng.uniform(0, 1, n)
    margin = rng.uniform(0, 0.5, n)
    cands = rng.choice([1, 2, 4, 8, 16], n)
    margin = np.where(cands > 1, margin, 0.0)
    coef, intercept = np.array([4.0, 6.0, -0.8]), -2.0
    p_true = _sigmoid(np.stack([best, margin, np.log(cands)], 1) @ coef + intercept)
    y = rng.uniform(size=n) < p_true
    cal = fit_calibration(best, margin, cands, y, features=LEGACY_FEATURES)
    np.testing.assert_allclose(cal.coef, coef, atol=0.3)
    assert abs(cal.intercept - intercept) < 0.3
    p = cal.confidences(best, margin, cands)
    for b in reliability(p, y):
        if b.count >= 500:
            assert abs(b.predicted - b.observed) < 0.04, b
    w, c = fit_logistic(np.stack([best, margin, np.log(cands)], 1), y)
    np.testing.assert_allclose(w, cal.coef) and np.testing.assert_allclose(c, cal.intercept)


def _basis_ward(n: int, lookalike: dict[int, int]) -> WardData:
    """Baby i: birth e_i, two D files e_j (j = lookalike.get(i, i)): exactly one right answer each."""
    eye = np.eye(n, dtype=np.float32)
    babies = [f"b{i:02d}" for i in range(n)]
    b_files = {b: [eye[i : i + 1]] for i, b in enumerate(babies)}
    d_files = {b: [eye[lookalike.get(i, i)][None] for _ in range(2)] for i, b in enumerate(babies)}
    return WardData.build(b_files, d_files)


def test_rooms_coverage_and_wrong_rate_have_the_known_answer() -> None:
    lookalike = {10: 0, 11: 1}  # babies 10 and 11 cry exactly like babies 0 and 1
    ward = _basis_ward(12, lookalike)
    rooms = draw_rooms(ward, 8, 2, 60, seed=4)
    assert all(len(r.enrolled) == 6 and len(r.strangers) == 2 for r in rooms)
    assert len({(r.enrolled, r.strangers) for r in rooms}) > 30  # seeded, varied
    assert rooms == draw_rooms(ward, 8, 2, 60, seed=4)
    q = score_rooms(ward, rooms)
    sharp = Calibration(coef=(30.0, 0.0, 0.0), intercept=-15.0)  # named iff best score ~1
    named = named_mask(q, sharp, NamingRule(0.5, 0.5))  # no baby confirmed: one threshold for all
    # expected by hand: every enrolled baby's file is named (its own vector, or its look-alike's when
    # that one is enrolled: wrong); a stranger's file is named (wrong) only when its look-alike is enrolled
    exp_named_enrolled = exp_enrolled = exp_named = exp_wrong = 0
    for room in rooms:
        enrolled = {int(b[1:]) for b in room.enrolled}
        for i in [int(b[1:]) for b in room.enrolled + room.strangers]:
            target = lookalike.get(i, i)
            hit = target in enrolled
            exp_enrolled += 2 * (i in enrolled)
            exp_named_enrolled += 2 * (i in enrolled and hit)
            exp_named += 2 * hit
            exp_wrong += 2 * (hit and target != i)
    assert int(named.sum()) == exp_named
    assert coverage(q, named) == pytest.approx(exp_named_enrolled / exp_enrolled)
    assert wrong_rate(q, named) == pytest.approx(exp_wrong / exp_named)
    assert 0 < wrong_rate(q, named) < 0.5


def test_the_evaluations_decisions_are_the_daemons_rule() -> None:
    """The eval names a query as the daemon's identifier would (``decision.names_best``): with the default
    thresholds (0.94; 1.0 until a cry is confirmed) birth references alone name nobody, however sure the
    map is; confirmed babies are named at min_confidence; the expert overrides apply too, with the margin
    of a one-candidate room taken as the best score, as the identifier does."""
    ward = _basis_ward(12, {10: 0, 11: 1})
    rooms = draw_rooms(ward, 8, 2, 30, seed=4)
    flag = Calibration(features=(*LEGACY_FEATURES, "best_confirmed"), coef=(0, 0, 0, 5.0), intercept=3.0)
    daemon = IdentifierSettings()  # the daemon's defaults, read as the eval reads settings.identifier
    k0, k1 = score_rooms(ward, rooms, 0), score_rooms(ward, rooms, 1, 1.0)
    assert not named_mask(k0, flag, daemon).any()  # confidence 0.9526 >= 0.94, but nobody is confirmed
    assert named_mask(k0, flag, NamingRule(0.94, 0.95)).all()  # lowered: every query named
    assert not named_mask(k0, flag, NamingRule(0.94, 0.96)).any()
    assert k1.best_confirmed.all() and named_mask(k1, flag, daemon).all()  # 0.99966 >= 0.94
    assert not named_mask(k1, flag, NamingRule(0.9998, 1.0)).any()
    sure = NamingRule(0.94, 0.94)
    assert named_mask(k1, flag, NamingRule(0.94, 1.0, min_score=0.99)).sum() == np.sum(k1.best >= 0.99)
    assert not named_mask(k1, flag, NamingRule(0.94, 1.0, min_margin=1.01)).any()  # basis: margin <= 1
    one = score_rooms(ward, draw_rooms(ward, 2, 1, 10, seed=1))  # one enrolled baby: margin = best (1)
    assert (one.n_candidates == 1).all() and (one.margin == 0).all()
    assert np.array_equal(named_mask(one, flag, replace(sure, min_margin=0.9)), one.best >= 0.9)
    assert named_mask(one, flag, replace(sure, min_margin=0.9)).any()


def _random_ward(n: int, seed: int, permute: bool = False, same_birth: bool = False) -> WardData:
    """Babies with their own direction (B and D files near it); ``permute`` gives each baby's D files to
    another baby (a label-permuted control); ``same_birth`` makes every birth recording alike."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(n, 32))
    babies = [f"b{i:02d}" for i in range(n)]
    common = rng.normal(size=32)
    b_files = {
        b: [(common if same_birth else dirs[i]) + 0.5 * rng.normal(size=(2, 32))]
        for i, b in enumerate(babies)
    }
    d_files = {b: [dirs[i] + 0.8 * rng.normal(size=(2, 32)) for _ in range(3)] for i, b in enumerate(babies)}
    if permute:
        d_files = {b: d_files[babies[(i + 1) % n]] for i, b in enumerate(babies)}
    return WardData.build(
        {b: [x.astype(np.float32) for x in v] for b, v in b_files.items()},
        {b: [x.astype(np.float32) for x in v] for b, v in d_files.items()},
    )


def test_label_permuted_control_is_chance_and_calibrates_to_the_base_rate() -> None:
    real = score_rooms(_random_ward(40, 1), draw_rooms(_random_ward(40, 1), 8, 2, 300, 2))
    assert top_k(real, 1) > 0.9  # the same generator with true labels is easy
    ward = _random_ward(40, 1, permute=True)
    fit_q = score_rooms(ward, draw_rooms(ward, 8, 2, 400, 5))
    test_q = score_rooms(ward, draw_rooms(ward, 8, 2, 400, 6))
    assert abs(top_k(test_q, 1) - 1 / 6) < 0.05  # chance among 6 enrolled
    cal = fit_calibration(fit_q.best, fit_q.margin, fit_q.n_candidates, fit_q.correct)
    p = cal.confidences(test_q.best, test_q.margin, test_q.n_candidates)
    base = float(test_q.correct.mean())
    assert abs(base - 0.75 / 6) < 0.04
    assert abs(float(p.mean()) - base) < 0.03 and float(p.std()) < 0.05
    assert not named_mask(test_q, cal, NamingRule(0.5, 0.5)).any()  # nothing is ever named


def test_confirming_one_file_per_baby_uses_the_confirmed_reference() -> None:
    ward = _random_ward(24, 2, same_birth=True)  # birth recordings say nothing; the ward's cries do
    rooms = draw_rooms(ward, 8, 2, 100, 3)
    k0 = score_rooms(ward, rooms, confirm=0)
    k1 = score_rooms(ward, rooms, confirm=1, confirmed_weight=1.0)
    assert top_k(k0, 1) < 0.4 and top_k(k1, 1) > 0.95
    # 3 D files per baby: K=1 leaves 2 queries per enrolled baby, strangers keep all 3
    assert len(k1) == sum(2 * len(r.enrolled) + 3 * len(r.strangers) for r in rooms)
    assert int(k1.enrolled.sum()) == sum(2 * len(r.enrolled) for r in rooms)
    half = score_rooms(ward, rooms, confirm=1, confirmed_weight=0.5)
    assert top_k(k0, 1) < top_k(half, 1) <= top_k(k1, 1)


# the optional inputs ------------------------------------------------------------------------------
OLD_MAP = {  # a calibration as manifests stored it before the optional inputs (the shipped model's)
    "method": "logistic",
    "features": ["best_score", "margin", "log_candidates"],
    "coef": [3.877885485685205, 3.6973216207721915, -0.6523841561544738],
    "intercept": -1.5147270358849623,
    "temperature": 0.11587448004356327,
    "confirmed_weight": 1.0,
    "data": "dev",
    "fitted_at": "2026-12-02T06:29:59+00:00",
    "n_queries": 10606,
    "room_size": 8,
    "room_strangers": 2,
    "rooms": 300,
    "seed": 0,
    "metrics": {"recommended_min_confidence": 0.98},
}


def test_an_old_format_map_loads_and_ignores_the_new_inputs() -> None:
    cal = Calibration.model_validate_json(json.dumps(OLD_MAP))
    assert cal.features == LEGACY_FEATURES and cal.recommended_min_confidence == 0.98
    p = cal.confidence(0.7, 0.1, 6)
    assert p == pytest.approx(_sigmoid(np.dot(OLD_MAP["coef"], [0.7, 0.1, np.log(6)]) + OLD_MAP["intercept"]))
    assert cal.confidence(0.7, 0.1, 6, best_confirmed=True, runner_confirmed=True, expirations=1,
                          others_mean=0.2) == p  # fmt: skip
    ids, scores = ["a", "b", "c"], np.array([0.3, 0.7, 0.6])
    assert cal.candidates(ids, scores, confirmed={"b"}, expirations=2) == cal.candidates(ids, scores)
    assert Calibration.model_validate_json(cal.model_dump_json()) == cal


@pytest.mark.parametrize(
    ("features", "coef"),
    [
        (["best_score", "margin", "log_candidates", "loudness"], [1, 1, 1, 1]),  # unknown input
        (["best_score", "margin", "log_candidates", "best_confirmed"], [1, 1, 1]),  # a weight short
        (["margin", "best_score", "log_candidates"], [1, 1, 1]),  # not the legacy three first
        (["best_score", "margin", "log_candidates", "margin"], [1, 1, 1, 1]),  # repeated
    ],
)
def test_a_map_with_bad_features_is_refused(features: list[str], coef: list[float]) -> None:
    with pytest.raises(ValueError, match=r"features|coef"):
        Calibration.model_validate({**OLD_MAP, "features": features, "coef": coef})


def test_the_confirmed_flag_and_episode_length_have_the_known_answer() -> None:
    """Generated queries whose probability of being right depends on whether the best candidate has a
    confirmed reference (its own slope and intercept) and on how many expirations were pooled: the fit
    recovers the weights, is calibrated within each group, and a legacy map (blind to both) is not."""
    rng = np.random.default_rng(12)
    n = 60_000
    best, margin = rng.uniform(0, 1, n), rng.uniform(0, 0.4, n)
    cands = rng.choice([2, 4, 8, 16], n)
    conf = rng.uniform(size=n) < 0.5
    runner = conf & (rng.uniform(size=n) < 0.5)
    n_exp = rng.integers(1, 9, n)
    feats = (*LEGACY_FEATURES, "best_confirmed", "confirmed_best_score", "confirmed_margin")
    feats = (*feats, "log_expirations")
    x = np.stack([best, margin, np.log(cands), conf, conf * best, conf * margin, np.log(n_exp)], 1)
    coef, intercept = np.array([3.0, 4.0, -0.7, 1.5, 2.0, 3.0, 0.8]), -3.0
    y = rng.uniform(size=n) < _sigmoid(x @ coef + intercept)
    cal = fit_calibration(best, margin, cands, y, features=feats, best_confirmed=conf,
                          runner_confirmed=runner, expirations=n_exp)  # fmt: skip
    assert cal.features == feats
    np.testing.assert_allclose(cal.coef, coef, atol=0.35)
    assert abs(cal.intercept - intercept) < 0.35
    p = cal.confidences(best, margin, cands, best_confirmed=conf, expirations=n_exp)
    old = fit_calibration(best, margin, cands, y)
    p_old = old.confidences(best, margin, cands)
    for group in (conf, ~conf, n_exp == 1, n_exp == 8):
        gap = abs(float(p[group].mean() - y[group].mean()))
        assert gap < 0.02
        assert abs(float(p_old[group].mean() - y[group].mean())) > 2 * gap + 0.03
    # the scalar call and the candidates agree with the vectorised map
    one = cal.confidence(0.8, 0.2, 4, best_confirmed=True, expirations=3)
    z = np.dot(coef, [0.8, 0.2, np.log(4), 1, 0.8, 0.2, np.log(3)]) + intercept
    assert one == pytest.approx(_sigmoid(z), abs=0.03)
    ids, scores = ["a", "b", "c", "d"], np.array([0.5, 0.8, 0.6, 0.1])
    ranked = cal.candidates(ids, scores, confirmed={"b"}, expirations=3)
    assert ranked[0].baby_id == "b" and ranked[0].probability == pytest.approx(one, rel=1e-12)
    unconfirmed = cal.candidates(ids, scores, expirations=3)
    unconfirmed_one = cal.confidence(0.8, 0.2, 4, expirations=3)
    assert unconfirmed[0].probability == pytest.approx(unconfirmed_one, rel=1e-12)
    assert unconfirmed_one < one
    # without an episode length the map assumes its typical one
    typical = int(cal.typical_expirations)
    assert cal.confidence(0.8, 0.2, 4) == cal.confidence(0.8, 0.2, 4, expirations=typical)
    assert Calibration.model_validate_json(cal.model_dump_json()) == cal


def test_rooms_with_partial_confirmations_and_short_episodes() -> None:
    ward = _random_ward(24, 4)
    rooms = draw_rooms(ward, 8, 2, 60, 1)
    k0, k1 = score_rooms(ward, rooms, 0), score_rooms(ward, rooms, 1, 1.0)
    assert not k0.best_confirmed.any() and k1.best_confirmed.all() and k1.runner_confirmed.all()
    assert (k0.n_expirations == 2).all()  # whole files of 2 expirations
    mixed = score_rooms(ward, rooms, 1, 1.0, confirm_share=0.5)
    assert 0.3 < mixed.best_confirmed.mean() < 0.7 and len(k1) < len(mixed) < len(k0)
    short = score_rooms(ward, rooms, 0, prefixes=True)
    assert set(short.n_expirations.tolist()) == {1, 2} and len(short) == len(k0)
    whole = short.n_expirations == 2
    np.testing.assert_allclose(short.best[whole], k0.best[whole], atol=1e-6)
    for q in (k0, mixed):
        s = np.array([np.sort(r)[::-1] for r in q.scores])
        np.testing.assert_allclose(q.others_mean, s[:, 1:].mean(1), atol=1e-9)
    cal = Calibration(features=(*LEGACY_FEATURES, "best_confirmed"), coef=(0, 0, 0, 5.0), intercept=-2.5)
    p = query_confidences(mixed, cal)
    np.testing.assert_allclose(p, np.where(mixed.best_confirmed, _sigmoid(2.5), _sigmoid(-2.5)))


# cryid model calibrate through the CLI ------------------------------------------------------------
@pytest.fixture(scope="module")
def calib_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.cryceleb import make_cryceleb_set

    return make_cryceleb_set(tmp_path_factory.mktemp("calib") / "set", n_babies=12, seed=11)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


CAL_ARGS = ["--room-size", "4", "--rooms", "40", "--folds", "3", "--bootstrap", "50"]


def test_model_calibrate_round_trips_through_the_manifest(
    small_onnx_model_dir: Path, calib_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(small_onnx_model_dir, model)
    onnx_before = (model / "model.onnx").read_bytes()
    assert load_manifest(model).calibration is None
    (model / "manifest.json").chmod(0o644)
    umask = os.umask(0o077)  # an admin's: the manifest must stay readable by the daemon's service user
    try:
        code, out, err = _run(capsys, "model", "calibrate", str(model), "--data", str(calib_set), *CAL_ARGS)
    finally:
        os.umask(umask)
    assert code == 0, err
    assert stat.S_IMODE((model / "manifest.json").stat().st_mode) == 0o644
    assert "calibration written" in out and "recommended min_confidence" in out
    cal = load_manifest(model).calibration
    assert cal is not None and cal.room_size == 4 and cal.room_strangers == 1 and cal.rooms == 40
    assert str(calib_set) in cal.data and cal.fitted_at and cal.n_queries > 100
    assert 0.0 < cal.recommended_min_confidence < 1.0
    assert cal.metrics["cv_wrong_rate_k0"] <= 0.05 or cal.metrics.get("cv_coverage_k0", 0) < 0.05
    assert cal.confirmed_weight in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert Calibration.model_validate_json(cal.model_dump_json()) == cal and cal.features == FEATURES
    assert (model / "model.onnx").read_bytes() == onnx_before
    assert load_manifest(model).onnx_sha256 == load_manifest(small_onnx_model_dir).onnx_sha256
    assert not list(model.glob(".manifest.json.*"))  # no temporary file left
    code, out, _ = _run(capsys, "model", "info", str(model))
    assert code == 0 and "recommended min_confidence" in out
    # eval decides with it, under the daemon's thresholds: coverage and wrong rate, with CIs
    out_json = tmp_path / "e.json"
    code, out, err = _run(capsys, "eval", "--data", str(calib_set), "--split", "dev", "--model", str(model),
                          "--protocol", "ward", "--room-size", "4", "--rooms", "30", "--bootstrap", "50",
                          "--json", str(out_json), "--plot", str(tmp_path / "p.png"))  # fmt: skip
    assert code == 0, err
    ident = json.loads(out_json.read_text())["identification"]
    assert ident["calibrated"] and ident["recommended_min_confidence"] == cal.recommended_min_confidence
    assert (
        ident["min_confidence"] == IdentifierSettings().min_confidence
    )  # the daemon's, not the recommendation
    assert ident["coverage"] is not None and ident["coverage_ci"] is not None
    assert ident["top1_ci"][0] <= ident["top1"] <= ident["top1_ci"][1]
    assert len(ident["operating_curve"]) > 50 and "coverage" in out


@pytest.mark.parametrize("problem", ["no_dir", "bad_onnx", "no_data", "room_too_big", "bad_option"])
def test_model_calibrate_bad_input_is_one_line_and_leaves_the_manifest(
    problem: str, small_onnx_model_dir: Path, calib_set: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(small_onnx_model_dir, model)
    data, extra = calib_set, list(CAL_ARGS)
    expected = {
        "no_dir": "no such model directory",
        "bad_onnx": "sha256",
        "no_data": "metadata.csv",
        "room_too_big": "at least 40",
        "bad_option": "--folds",
    }[problem]
    if problem == "no_dir":
        model = tmp_path / "nowhere"
    elif problem == "bad_onnx":
        with open(model / "model.onnx", "ab") as fh:
            fh.write(b"\0")
    elif problem == "no_data":
        data = tmp_path / "empty"
        data.mkdir()
    elif problem == "room_too_big":
        extra[1] = "40"
    elif problem == "bad_option":
        extra[5] = "1"
    before = (model / "manifest.json").read_bytes() if model.is_dir() else None
    code, out, err = _run(capsys, "model", "calibrate", str(model), "--data", str(data), *extra)
    assert code == 2, (out, err)
    assert err.startswith("cryid: error:") and err.count("\n") == 1 and expected in err, err
    if before is not None:
        assert (model / "manifest.json").read_bytes() == before
        names = sorted(p.name for p in model.iterdir())
        assert names == sorted(p.name for p in small_onnx_model_dir.iterdir())


def test_the_daemons_call_gives_the_evaluations_confidence() -> None:
    """``candidates(ids, scores, confirmed=...)`` (the daemon's call, with ``ReferenceSet.confirmed_ids``)
    gives each query the confidence the evaluation and the calibration use (``query_confidences``)."""
    from cryid.models.calibration import FEATURES as NEW

    ward = _random_ward(16, 5)
    rooms = draw_rooms(ward, 6, 1, 10, 2)
    cal = Calibration(features=NEW, coef=(2.0, 3.0, -0.6, -2.0, 4.5, -0.8), intercept=-0.6)
    for k in (0, 1):
        q = score_rooms(ward, rooms, k, 1.0)
        p = query_confidences(q, cal)
        for i in range(0, len(q), 7):
            ids = sorted(rooms[int(q.room[i])].enrolled)
            ranked = cal.candidates(ids, q.scores[i], confirmed=set(ids) if k else frozenset())
            assert ranked[0].probability == pytest.approx(p[i], abs=1e-12)
        unflagged = cal.confidences(q.best, q.margin, q.n_candidates)
        assert np.allclose(p, unflagged) == (k == 0)  # the flag changes the answer once confirmed
