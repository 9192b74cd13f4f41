"""The ward protocol of ``cryid eval``: enroll from B files, identify D files in simulated rooms.

Each file is segmented and embedded exactly as enrollment and the daemon do (``pipeline.embed_expirations``);
rooms, confirmations, scores and decisions come from ``cryid.models.evaluation.ward``. Without
``--room-size`` there is one room: every baby whose B files hold an expiration is enrolled, the others'
D files are strangers.
Decisions are the daemon's: the model's calibration (``manifest.calibration``) and the decision rule the
identifier applies (``cryid.models.decision.names_best``) with the thresholds of the loaded configuration:
``identifier.min_confidence`` (``--min-confidence`` replaces it for one run) for a best candidate with a
confirmed cry, ``identifier.min_confidence_unconfirmed`` (by default: never named) for one without.
``what_if_unconfirmed_at_min_confidence`` is labelled as what it is: the same figures were babies without a
confirmed cry named at min_confidence too, which the daemon does not do unless configured to. An
uncalibrated model reports no coverage or wrong-baby rate.
Intervals are percentile bootstraps over infants (each resample draws infants with replacement and
weighs each query by how often its crying infant was drawn).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cryid.models.audio import load_audio
from cryid.models.calibration import Calibration
from cryid.models.config import SegmenterSettings
from cryid.models.decision import NamingRule, NamingThresholds
from cryid.models.evaluation.channel import WardChannel
from cryid.models.evaluation.cryceleb import CryCelebError, CryCelebSet, Recording
from cryid.models.evaluation.embedders import EmbeddingCache, EvalEmbedder, Throughput, file_fingerprint
from cryid.models.evaluation.metrics import bootstrap_ci, infant_codes
from cryid.models.evaluation.options import EvalOptions
from cryid.models.evaluation.ward import (
    RoomQueries,
    WardData,
    coverage,
    draw_rooms,
    named_mask,
    open_set_eer,
    operating_curve,
    query_confidences,
    score_rooms,
    top_k,
    whole_ward,
    wrong_rate,
)

logger = logging.getLogger(__name__)

POOLING = "re-normalised mean of the file's L2-normalised expiration embeddings (as a daemon episode)"
Interval = tuple[float, float] | None


def progress(items: Iterable[Any], desc: str, total: int) -> Iterable[Any]:
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, unit="item", leave=False, disable=None)


def load_recording(rec: Recording, sample_rate: int, channel: WardChannel | None = None) -> np.ndarray:
    """A recording's audio, through the simulated ward channel when one is given."""
    wav = load_audio(rec.path, sample_rate)
    return wav if channel is None else channel.apply(wav, rec.file_id)


def channel_key(channel: WardChannel | None) -> str:
    """Cache-key suffix: embeddings of a file differ with the channel it went through."""
    return "" if channel is None else f"|{channel.key}"


def file_expiration_embeddings(
    rec: Recording,
    embedder: EvalEmbedder,
    segmenter: SegmenterSettings,
    cache: EmbeddingCache,
    meter: Throughput,
    channel: WardChannel | None = None,
) -> np.ndarray:
    """(n, dim) embeddings of the expirations the segmenter finds in one file (n may be 0)."""
    from cryid.models.pipeline import embed_expirations

    def compute() -> np.ndarray:
        wav = load_recording(rec, embedder.sample_rate, channel)
        meter.start()
        embedded = embed_expirations(wav, segmenter, embedder)  # type: ignore[arg-type]
        meter.stop(len(wav) / embedder.sample_rate)
        if not embedded:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([e.embedding for e in embedded])

    key = f"expirations|{segmenter.model_dump_json()}|{file_fingerprint(rec.path)}{channel_key(channel)}"
    return cache.get_or_compute(key, compute)


def split_ward_data(
    data: CryCelebSet,
    split: str,
    embedder: EvalEmbedder,
    segmenter: SegmenterSettings,
    cache: EmbeddingCache,
    meter: Throughput,
    channel: WardChannel | None = None,
) -> tuple[WardData, dict[str, np.ndarray]]:
    """Every file of ``split`` segmented and embedded; the ward's view of it and the per-file arrays."""
    groups = data.groups(split)
    recs = [r for key in groups for r in groups[key]]
    per_file = {
        r.file_id: file_expiration_embeddings(r, embedder, segmenter, cache, meter, channel)
        for r in progress(recs, f"segmenting and embedding {len(recs)} files", len(recs))
    }
    by_period: dict[str, dict[str, list[np.ndarray]]] = {"B": {}, "D": {}}
    for (baby, period), files in groups.items():
        if period in by_period:
            by_period[period][baby] = [per_file[r.file_id] for r in files]
    return WardData.build(by_period["B"], by_period["D"]), per_file


@dataclass(frozen=True)
class WardReport:
    """Ward protocol results (fractions 0-1; ``*_ci``: bootstrap 95% intervals over infants)."""

    top1: float | None
    top5: float | None
    eer: float | None
    enrolled: int  # babies that could be enrolled (a birth expiration)
    queries: int  # queries of enrolled babies (summed over rooms): the top-1/top-5/coverage base
    unenrolled_queries: int  # queries of strangers: may only be "unknown"
    b_files_without_expirations: int
    d_files_without_expirations: int
    babies_not_enrolled: list[str]
    pooling: str
    rooms: dict[str, int] | None  # size, strangers, count, seed; None: one room with every baby
    confirm: int
    confirmed_weight: float
    calibrated: bool
    # the decision rule (None without a calibration): identifier.min_confidence (or --min-confidence), ...
    min_confidence: float | None
    min_confidence_from: str | None  # "identifier.min_confidence" or "--min-confidence"
    min_confidence_unconfirmed: float | None
    min_score: float | None
    min_margin: float | None
    recommended_min_confidence: float | None  # the calibration's recommendation (the daemon does not read it)
    coverage: float | None
    wrong_rate: float | None
    named: int | None
    top1_ci: Interval
    top5_ci: Interval
    eer_ci: Interval
    coverage_ci: Interval
    wrong_rate_ci: Interval
    infants: int  # crying infants among the queries (the bootstrap's units)
    operating_curve: list[dict[str, float | None]] | None
    # NOT the daemon's rule: babies without a confirmed cry named at min_confidence too (None: no decisions)
    what_if_unconfirmed_at_min_confidence: dict[str, Any] | None
    target_scores: list[float] = field(repr=False)
    nontarget_scores: list[float] = field(repr=False)


WHAT_IF_NOTE = (
    "NOT the daemon's decision: babies without a confirmed cry named at min_confidence too "
    "(the daemon needs identifier.min_confidence_unconfirmed for them)"
)


def _decision_figures(
    q: RoomQueries, named: np.ndarray, codes: np.ndarray, n_infants: int, resamples: int, seed: int
) -> dict[str, Any]:
    """Coverage and wrong-baby rate of the ``named`` queries, with their bootstrap intervals."""
    out: dict[str, Any] = {"coverage": coverage(q, named), "wrong_rate": wrong_rate(q, named)}
    out["named"] = int(named.sum())
    stats = {
        "coverage": lambda w: coverage(q, named, w),
        "wrong_rate": lambda w: wrong_rate(q, named, w),
    }
    for name, fn in stats.items():
        out[f"{name}_ci"] = (
            None
            if out[name] is None or not resamples
            else bootstrap_ci(n_infants, lambda counts, fn=fn: fn(counts[codes]), resamples, seed)
        )
    return out


def ward_figures(
    q: RoomQueries, calibration: Calibration | None, rule: NamingRule | None, resamples: int, seed: int
) -> dict[str, Any]:
    """Point figures, their bootstrap intervals and the operating curve of scored room queries; the
    decisions (coverage, wrong-baby rate, curve, what-if) only with a calibration and a rule."""
    stats = {
        "top1": lambda w: top_k(q, 1, w),
        "top5": lambda w: top_k(q, 5, w),
        "eer": lambda w: open_set_eer(q, w),
    }
    out: dict[str, Any] = {k: fn(None) for k, fn in stats.items()}
    codes, n_infants = infant_codes(q.infant)
    out["infants"] = n_infants
    for name, fn in stats.items():
        out[f"{name}_ci"] = (
            None
            if out[name] is None or not resamples
            else bootstrap_ci(n_infants, lambda counts, fn=fn: fn(counts[codes]), resamples, seed)
        )
    if calibration is None or rule is None:
        none = ("coverage", "wrong_rate", "named", "coverage_ci", "wrong_rate_ci", "operating_curve")
        out.update(dict.fromkeys(none))
        out["what_if_unconfirmed_at_min_confidence"] = None
        return out
    p = query_confidences(q, calibration)
    named = named_mask(q, calibration, rule)
    out.update(_decision_figures(q, named, codes, n_infants, resamples, seed))
    out["operating_curve"] = operating_curve(q, p, rule)
    what_if = replace(rule, min_confidence_unconfirmed=rule.min_confidence)
    out["what_if_unconfirmed_at_min_confidence"] = {
        "note": WHAT_IF_NOTE,
        **_decision_figures(q, named_mask(q, calibration, what_if), codes, n_infants, resamples, seed),
    }
    return out


def ward_protocol(
    data: CryCelebSet,
    split: str,
    embedder: EvalEmbedder,
    segmenter: SegmenterSettings,
    cache: EmbeddingCache,
    meter: Throughput,
    options: EvalOptions | None = None,
    calibration: Calibration | None = None,
    channel: WardChannel | None = None,
    rule: NamingThresholds | None = None,
) -> WardReport:
    """Enroll each baby from its B files, identify D files (see the module docstring). ``rule``: the
    daemon's thresholds (``settings.identifier``); None: no decisions."""
    options = options or EvalOptions(split=split)  # type: ignore[arg-type]
    ward, per_file = split_ward_data(data, split, embedder, segmenter, cache, meter, channel)
    if not ward.birth:
        raise CryCelebError(
            f"{split}: the segmenter found no expiration in any B file; nobody could be enrolled"
        )
    if not any(ward.d_files.values()):
        raise CryCelebError(f"{split}: no D file with an expiration; the ward protocol needs D recordings")
    if options.room_size is None:
        rooms = whole_ward(ward)
    else:
        if options.room_size > len(ward.pool):
            raise CryCelebError(
                f"--room-size {options.room_size}: {split} has only {len(ward.pool)} infants with B and D "
                f"recordings; give at most {len(ward.pool)}"
            )
        rooms = draw_rooms(ward, options.room_size, options.strangers, options.rooms, options.seed)
    weight = (
        calibration.confirmed_weight
        if calibration is not None
        else float(Calibration.model_fields["confirmed_weight"].default)
    )
    q = score_rooms(ward, rooms, options.confirm, weight, options.seed)
    if not q.enrolled.any():
        logger.warning(
            "%s: no D file belongs to an enrolled baby (B and D ids differ?); no identification", split
        )
    decide = None if calibration is None or rule is None else NamingRule.of(rule)
    if decide is not None and options.min_confidence is not None:
        decide = replace(decide, min_confidence=options.min_confidence)
    source = "--min-confidence" if options.min_confidence is not None else "identifier.min_confidence"
    source = None if decide is None else source
    if calibration is not None and rule is None:
        logger.warning("no decision rule given (the identifier settings): no coverage or wrong-baby rate")
    figures = ward_figures(q, calibration, decide, options.bootstrap, options.seed)
    tgt, _, non, _ = q.targets
    groups = data.groups(split)
    return WardReport(
        enrolled=len(ward.birth),
        queries=int(q.enrolled.sum()),
        unenrolled_queries=int((~q.enrolled).sum()),
        b_files_without_expirations=sum(
            1
            for (_, period), files in groups.items()
            if period == "B"
            for r in files
            if per_file[r.file_id].size == 0
        ),
        d_files_without_expirations=sum(
            1
            for (_, period), files in groups.items()
            if period == "D"
            for r in files
            if per_file[r.file_id].size == 0
        ),
        babies_not_enrolled=sorted({b for b, p in groups if p == "B"} - set(ward.birth)),
        pooling=POOLING,
        rooms=None
        if options.room_size is None
        else {
            "size": options.room_size,
            "strangers": options.strangers,
            "count": options.rooms,
            "seed": options.seed,
        },
        confirm=options.confirm,
        confirmed_weight=weight,
        calibrated=calibration is not None,
        min_confidence=None if decide is None else decide.min_confidence,
        min_confidence_from=source,
        min_confidence_unconfirmed=None if decide is None else decide.min_confidence_unconfirmed,
        min_score=None if decide is None else decide.min_score,
        min_margin=None if decide is None else decide.min_margin,
        recommended_min_confidence=None if calibration is None else calibration.recommended_min_confidence,
        target_scores=[float(s) for s in tgt],
        nontarget_scores=[float(s) for s in non],
        **figures,
    )
