"""The ward protocol of ``cryid eval``: enroll from B files, identify D files in simulated rooms.

Each file is segmented and embedded exactly as enrollment and the daemon do (``pipeline.embed_expirations``);
rooms, confirmations, scores and decisions come from ``cryid.models.evaluation.ward``. Without
``--room-size`` there is one room: every baby whose B files hold an expiration is enrolled, the others'
D files are strangers.
Decisions use the model's calibration (``manifest.calibration``) at ``--min-confidence`` (default: the
value the calibration recommends); an uncalibrated model reports no coverage or wrong-baby rate.
Intervals are percentile bootstraps over infants (each resample draws infants with replacement and
weighs each query by how often its crying infant was drawn).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cryid.models.audio import load_audio
from cryid.models.calibration import Calibration
from cryid.models.config import SegmenterSettings
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
    min_confidence: float | None
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
    target_scores: list[float] = field(repr=False)
    nontarget_scores: list[float] = field(repr=False)


def ward_figures(
    q: RoomQueries, calibration: Calibration | None, min_confidence: float | None, resamples: int, seed: int
) -> dict[str, Any]:
    """Point figures, their bootstrap intervals and the operating curve of scored room queries."""
    named = (
        None if calibration is None or min_confidence is None else named_mask(q, calibration, min_confidence)
    )
    stats = {
        "top1": lambda w: top_k(q, 1, w),
        "top5": lambda w: top_k(q, 5, w),
        "eer": lambda w: open_set_eer(q, w),
    }
    if named is not None:
        stats["coverage"] = lambda w: coverage(q, named, w)
        stats["wrong_rate"] = lambda w: wrong_rate(q, named, w)
    out: dict[str, Any] = {k: fn(None) for k, fn in stats.items()}
    out.setdefault("coverage", None)
    out.setdefault("wrong_rate", None)
    out["named"] = None if named is None else int(named.sum())
    codes, n_infants = infant_codes(q.infant)
    out["infants"] = n_infants
    for name in ("top1", "top5", "eer", "coverage", "wrong_rate"):
        fn = stats.get(name)
        out[f"{name}_ci"] = (
            None
            if fn is None or out[name] is None or not resamples
            else bootstrap_ci(n_infants, lambda counts, fn=fn: fn(counts[codes]), resamples, seed)
        )
    out["operating_curve"] = (
        None if calibration is None else operating_curve(q, query_confidences(q, calibration))
    )
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
) -> WardReport:
    """Enroll each baby from its B files, identify D files (see the module docstring)."""
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
    min_conf = options.min_confidence
    if min_conf is None and calibration is not None:
        min_conf = calibration.recommended_min_confidence
        if min_conf is None:
            min_conf = 0.5
            logger.warning("the model's calibration recommends no min_confidence; using 0.5")
    figures = ward_figures(q, calibration, min_conf, options.bootstrap, options.seed)
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
        min_confidence=min_conf if calibration is not None else None,
        target_scores=[float(s) for s in tgt],
        nontarget_scores=[float(s) for s in non],
        **figures,
    )
