"""Offline evaluation: the CryCeleb2023 paper protocol and the ward's own protocol.

Paper protocol (Ubenwa's evaluate notebook): all cries of a (baby, period) concatenated in
chronological order, one embedding each, cosine of B against D for every pair of
``<split>_pairs.csv``, EER as ``speechbrain.utils.metric_stats.EER`` (``metrics.eer`` is bit-identical).
Options from the best challenge systems: ``tta`` (average the scores of N seeded shuffled
concatenation orders) and AS-norm against cohort embeddings (the concatenations of another split).

Ward protocol: each baby enrolled from its B files exactly as enrollment does (``pipeline.embed_expirations``
then ``scoring.centroid``); each D file, segmented the same way, is pooled like a daemon episode (the
re-normalised mean of its L2-normalised expiration embeddings, ``scoring.centroid``) and scored against
every enrolled baby: top-1/top-5 identification and the open-set EER of those scores.
This module never imports ``cryid.enrollment`` or ``cryid.daemon``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cryid.models.audio import load_audio
from cryid.models.config import SegmenterSettings
from cryid.models.cryceleb import CryCelebError, CryCelebSet, Pair, Recording, load_cryceleb
from cryid.models.eval_backends import EmbeddingBackend, EmbeddingCache, Throughput, file_fingerprint
from cryid.models.metrics import eer, identification_rates, min_dcf
from cryid.models.scoring import centroid, cosine_matrix, l2_normalize

logger = logging.getLogger(__name__)

GroupKey = tuple[str, str]  # (baby_id, period)
POOLING = "re-normalised mean of the file's L2-normalised expiration embeddings (as a daemon episode)"


class EvalOptions(BaseModel):
    """How ``cryid eval`` evaluates; each default is written here once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    split: Literal["dev", "test"] = Field(description="Split whose pairs (and B/D recordings) are evaluated.")
    protocol: Literal["pairs", "ward", "both"] = Field(
        "both", description="pairs: the paper's protocol; ward: enroll B files, identify D files; both."
    )
    tta: int = Field(
        1,
        ge=1,
        le=64,
        description="1: chronological concatenation; N>1: mean score of N seeded shuffled orders.",
    )
    seed: int = Field(0, ge=0, description="Seed of the shuffled concatenation orders of --tta.")
    score_norm: Literal["none", "asnorm"] = Field(
        "none", description="Score normalisation of the pair scores."
    )
    cohort: str = Field(
        "train", min_length=1, description="Split whose concatenations form the AS-norm cohort."
    )
    cohort_top_k: int = Field(
        200, ge=1, le=100_000, description="AS-norm: the k cohort scores closest to each side."
    )


@dataclass(frozen=True)
class PairReport:
    """Paper protocol results; metric fields are None when the pairs file has no labels."""

    pairs: int
    positive_pairs: int | None
    eer: float | None
    threshold: float | None
    min_dcf: float | None
    min_dcf_threshold: float | None
    eer_channel_matched: float | None
    channel_matched_pairs: int | None
    labels: bool
    tta: int
    score_norm: str
    cohort_size: int | None
    pair_ids: list[str] = field(repr=False)
    scores: list[float] = field(repr=False)
    label_values: list[int | None] = field(repr=False)


@dataclass(frozen=True)
class WardReport:
    """Ward protocol results (fractions 0-1)."""

    top1: float | None
    top5: float | None
    eer: float | None
    enrolled: int
    queries: int  # D files of enrolled babies with at least one expiration (top-1/top-5 base)
    unenrolled_queries: int  # D files of babies that could not be enrolled: non-target scores only
    b_files_without_expirations: int
    d_files_without_expirations: int
    babies_not_enrolled: list[str]
    pooling: str
    target_scores: list[float] = field(repr=False)
    nontarget_scores: list[float] = field(repr=False)


def _progress(items: Iterable[Any], desc: str, total: int) -> Iterable[Any]:
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, unit="item", leave=False, disable=None)


def _orders(recs: list[Recording], k: int, seed: int, key: GroupKey) -> list[Recording]:
    """Order ``k`` of a group: chronological for k=-1, else a shuffle seeded by (seed, k, group)."""
    if k < 0:
        return recs
    digest = int(hashlib.sha256(f"{key[0]}|{key[1]}".encode()).hexdigest()[:16], 16)
    rng = np.random.default_rng([seed, k, digest])
    return [recs[i] for i in rng.permutation(len(recs))]


def concatenation_embeddings(
    groups: dict[GroupKey, list[Recording]],
    keys: list[GroupKey],
    backend: EmbeddingBackend,
    cache: EmbeddingCache,
    meter: Throughput,
    order: int = -1,
    seed: int = 0,
) -> np.ndarray:
    """One embedding per (baby, period) in ``keys``: its files concatenated (order -1: chronological)."""
    out = []
    for key in _progress(keys, f"embedding {len(keys)} concatenations", len(keys)):
        recs = _orders(groups[key], order, seed, key)

        def compute(recs: list[Recording] = recs) -> np.ndarray:
            wav = np.concatenate([load_audio(r.path, backend.sample_rate) for r in recs])
            meter.start()
            emb = backend.embed(wav, backend.sample_rate)
            meter.stop(len(wav) / backend.sample_rate)
            return emb

        fingerprint = "|".join(file_fingerprint(r.path) for r in recs)
        out.append(cache.get_or_compute(f"concat|{backend.sample_rate}|{fingerprint}", compute))
    return np.stack(out)


def as_norm(
    scores: np.ndarray, emb_b: np.ndarray, emb_d: np.ndarray, cohort: np.ndarray, top_k: int
) -> np.ndarray:
    """Adaptive symmetric normalisation: each side standardised by its ``top_k`` closest cohort scores."""
    k = min(top_k, cohort.shape[0])

    def stats(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = cosine_matrix(emb, cohort).astype(np.float64)
        top = -np.sort(-s, axis=1)[:, :k]
        return top.mean(axis=1), np.maximum(top.std(axis=1), 1e-6)

    mu_b, sd_b = stats(emb_b)
    mu_d, sd_d = stats(emb_d)
    return 0.5 * ((scores - mu_b) / sd_b + (scores - mu_d) / sd_d)


def _verification(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float, float, float] | None:
    if pos.size == 0 or neg.size == 0:
        return None
    e, thr = eer(pos, neg)
    dcf, dcf_thr = min_dcf(pos, neg)
    return e, thr, dcf, dcf_thr


def pair_protocol(
    data: CryCelebSet,
    split: str,
    pairs: list[Pair],
    backend: EmbeddingBackend,
    cache: EmbeddingCache,
    meter: Throughput,
    options: EvalOptions,
) -> PairReport:
    """The paper's protocol on ``pairs`` (see the module docstring)."""
    groups = data.groups(split)
    b_keys = sorted({(p.baby_id_b, "B") for p in pairs})
    d_keys = sorted({(p.baby_id_d, "D") for p in pairs})
    b_row = {k: i for i, k in enumerate(b_keys)}
    d_row = {k: i for i, k in enumerate(d_keys)}
    ib = np.array([b_row[(p.baby_id_b, "B")] for p in pairs])
    id_ = np.array([d_row[(p.baby_id_d, "D")] for p in pairs])
    cohort = None
    if options.score_norm == "asnorm":
        cohort_groups = data.groups(options.cohort)
        if not cohort_groups:
            raise CryCelebError(
                f"--cohort {options.cohort}: metadata.csv has no recordings in that split; "
                "name a split such as train"
            )
        data.check_audio(options.cohort)
        cohort = l2_normalize(
            concatenation_embeddings(cohort_groups, list(cohort_groups), backend, cache, meter)
        )
    orders = [-1] if options.tta == 1 else list(range(options.tta))
    total = np.zeros(len(pairs), dtype=np.float64)
    for order in orders:
        emb_b = l2_normalize(
            concatenation_embeddings(groups, b_keys, backend, cache, meter, order, options.seed)
        )
        emb_d = l2_normalize(
            concatenation_embeddings(groups, d_keys, backend, cache, meter, order, options.seed)
        )
        # float32 cosines, as the notebook's torch.nn.CosineSimilarity(...).item(), then float64
        raw = np.einsum("ij,ij->i", emb_b[ib], emb_d[id_]).astype(np.float32).astype(np.float64)
        if cohort is not None:
            raw = as_norm(raw, emb_b[ib], emb_d[id_], cohort, options.cohort_top_k)
        total += raw
    scores = total / len(orders)
    labels = [p.label for p in pairs]
    has_labels = all(lab is not None for lab in labels)
    result = dict.fromkeys(("eer", "threshold", "min_dcf", "min_dcf_threshold", "eer_channel_matched"))
    matched_n = None
    positives = None
    if has_labels:
        lab = np.array(labels, dtype=np.int64)
        positives = int(lab.sum())
        ver = _verification(scores[lab == 1], scores[lab == 0])
        if ver is None:
            raise CryCelebError(
                f"{split}_pairs.csv: EER needs both positive and negative pairs (has {positives} positive "
                f"of {len(pairs)}); use the full B x D pairs file"
            )
        result.update(eer=ver[0], threshold=ver[1], min_dcf=ver[2], min_dcf_threshold=ver[3])
        if data.channels is not None:
            matched = np.array(
                [
                    (c := data.channel_of(groups[(p.baby_id_b, "B")])) is not None
                    and c == data.channel_of(groups[(p.baby_id_d, "D")])
                    for p in pairs
                ]
            )
            matched_n = int(matched.sum())
            ver_m = _verification(scores[matched & (lab == 1)], scores[matched & (lab == 0)])
            result["eer_channel_matched"] = None if ver_m is None else ver_m[0]
    return PairReport(
        pairs=len(pairs),
        positive_pairs=positives,
        labels=has_labels,
        channel_matched_pairs=matched_n,
        tta=options.tta,
        score_norm=options.score_norm,
        cohort_size=None if cohort is None else int(cohort.shape[0]),
        pair_ids=[p.pair_id for p in pairs],
        scores=[float(s) for s in scores],
        label_values=labels,
        **result,
    )


def file_expiration_embeddings(
    rec: Recording,
    backend: EmbeddingBackend,
    segmenter: SegmenterSettings,
    cache: EmbeddingCache,
    meter: Throughput,
) -> np.ndarray:
    """(n, dim) embeddings of the expirations the segmenter finds in one file (n may be 0)."""
    from cryid.models.pipeline import embed_expirations

    def compute() -> np.ndarray:
        wav = load_audio(rec.path, backend.sample_rate)
        meter.start()
        embedded = embed_expirations(wav, segmenter, backend)  # type: ignore[arg-type]
        meter.stop(len(wav) / backend.sample_rate)
        if not embedded:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([e.embedding for e in embedded])

    key = f"expirations|{segmenter.model_dump_json()}|{file_fingerprint(rec.path)}"
    return cache.get_or_compute(key, compute)


def ward_protocol(
    data: CryCelebSet,
    split: str,
    backend: EmbeddingBackend,
    segmenter: SegmenterSettings,
    cache: EmbeddingCache,
    meter: Throughput,
) -> WardReport:
    """Enroll each baby from its B files, identify each D file (see the module docstring)."""
    groups = data.groups(split)
    recs = [r for key in groups for r in groups[key]]
    per_file = {
        r.file_id: file_expiration_embeddings(r, backend, segmenter, cache, meter)
        for r in _progress(recs, f"segmenting and embedding {len(recs)} files", len(recs))
    }
    babies_b = sorted({b for b, p in groups if p == "B"})
    enrolled, centroids, not_enrolled = [], [], []
    for baby in babies_b:
        embs = [per_file[r.file_id] for r in groups[(baby, "B")] if per_file[r.file_id].shape[0] > 0]
        if embs:
            enrolled.append(baby)
            centroids.append(centroid(np.concatenate(embs)))
        else:
            not_enrolled.append(baby)
    if not enrolled:
        raise CryCelebError(
            f"{split}: the segmenter found no expiration in any B file; nobody could be enrolled"
        )
    column = {b: i for i, b in enumerate(enrolled)}
    queries, truth, silent = [], [], 0
    for (baby, period), files in groups.items():
        if period != "D":
            continue
        for r in files:
            emb = per_file[r.file_id]
            if emb.shape[0] == 0:
                silent += 1
                continue
            queries.append(centroid(emb))
            truth.append(column.get(baby, -1))
    if not queries:
        raise CryCelebError(f"{split}: no D file with an expiration; the ward protocol needs D recordings")
    scores = cosine_matrix(np.stack(queries), np.stack(centroids)).astype(np.float64)
    truth_arr = np.array(truth)
    known = truth_arr >= 0
    target_mask = np.zeros_like(scores, dtype=bool)
    target_mask[np.flatnonzero(known), truth_arr[known]] = True
    targets, nontargets = scores[target_mask], scores[~target_mask]
    top1 = top5 = ward_eer = None
    if known.any():
        ident = identification_rates(scores[known], truth_arr[known])
        top1, top5 = ident.top1, ident.top5
        if nontargets.size:
            ward_eer = eer(targets, nontargets)[0]
    else:
        logger.warning(
            "%s: no D file belongs to an enrolled baby (B and D ids differ?); no identification", split
        )
    return WardReport(
        top1=top1,
        top5=top5,
        eer=ward_eer,
        enrolled=len(enrolled),
        queries=int(known.sum()),
        unenrolled_queries=int((~known).sum()),
        b_files_without_expirations=sum(
            1
            for (_, period), files in groups.items()
            if period == "B"
            for r in files
            if per_file[r.file_id].size == 0
        ),
        d_files_without_expirations=silent,
        babies_not_enrolled=not_enrolled,
        pooling=POOLING,
        target_scores=[float(s) for s in targets],
        nontarget_scores=[float(s) for s in nontargets],
    )


@dataclass(frozen=True)
class EvalReport:
    """Everything ``cryid eval`` measured; ``to_json`` gives the ``--json`` document."""

    data: str
    split: str
    backend: str
    model: str
    model_sha256: str
    pairs: PairReport | None
    ward: WardReport | None
    throughput: dict[str, dict[str, float | int | None]]
    cache: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "data": self.data,
            "split": self.split,
            "backend": self.backend,
            "model": self.model,
            "model_sha256": self.model_sha256,
        }
        if self.pairs is not None:
            pr = {
                k: v for k, v in asdict(self.pairs).items() if k not in ("pair_ids", "scores", "label_values")
            }
            doc.update(pr)
        if self.ward is not None:
            wr = asdict(self.ward)
            doc["identification"] = {
                k: v for k, v in wr.items() if k not in ("target_scores", "nontarget_scores")
            }
        doc["throughput"] = self.throughput
        doc["cache"] = self.cache
        return doc


def run_evaluation(
    data_dir: Path,
    options: EvalOptions,
    backend: EmbeddingBackend,
    backend_name: str,
    model_label: str,
    segmenter: SegmenterSettings,
    cache_dir: Path | None,
) -> EvalReport:
    """Read the data set, run the chosen protocols, return the report (writes nothing but cache entries)."""
    data = load_cryceleb(data_dir)
    if not data.split_recordings(options.split):
        raise CryCelebError(
            f"{data.root}/metadata.csv: no recordings in split {options.split!r}; pick another split"
        )
    pairs = data.read_pairs(options.split) if options.protocol in ("pairs", "both") else None
    data.check_audio(options.split)
    cache = EmbeddingCache(cache_dir, backend.sha256)
    meters = {"pairs": Throughput(), "ward": Throughput()}
    pair_report = ward_report = None
    if pairs is not None:
        pair_report = pair_protocol(data, options.split, pairs, backend, cache, meters["pairs"], options)
    if options.protocol in ("ward", "both"):
        ward_report = ward_protocol(data, options.split, backend, segmenter, cache, meters["ward"])
    return EvalReport(
        data=str(data.root),
        split=options.split,
        backend=backend_name,
        model=model_label,
        model_sha256=backend.sha256,
        pairs=pair_report,
        ward=ward_report,
        throughput={k: m.as_dict() for k, m in meters.items() if m.items},
        cache={
            "dir": None if cache.root is None else str(cache.root),
            "hits": cache.hits,
            "misses": cache.misses,
        },
    )
