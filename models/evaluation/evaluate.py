"""Offline evaluation: the CryCeleb2023 paper protocol and the ward's own protocol.

Paper protocol (Ubenwa's evaluate notebook): all cries of a (baby, period) concatenated in
chronological order, one embedding each, cosine of B against D for every pair of
``<split>_pairs.csv``, EER as ``speechbrain.utils.metric_stats.EER`` (``metrics.eer`` is bit-identical).
Options from the best challenge systems: ``tta`` (average the scores of N seeded shuffled
concatenation orders) and AS-norm against cohort embeddings (the concatenations of another split).

Ward protocol: each baby enrolled from its B files exactly as enrollment does (``pipeline.embed_expirations``
then ``scoring.centroid``); each D file, segmented the same way, is pooled like a daemon episode (the
re-normalised mean of its L2-normalised expiration embeddings, ``scoring.centroid``) and scored against
every enrolled baby: top-1/top-5 identification and the open-set EER of those scores; in simulated
rooms, with confirmations and the calibrated decisions (coverage, wrong-baby rate): ``ward_eval``.
Every EER gets a bootstrap 95% interval over infants; ``--ward-channel`` passes every recording through
one simulated ward channel (``channel.WardChannel``) first.
This module never imports ``cryid.enrollment`` or ``cryid.daemon``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryid.models.config import SegmenterSettings
from cryid.models.decision import NamingThresholds
from cryid.models.evaluation.channel import WardChannel
from cryid.models.evaluation.cryceleb import CryCelebError, CryCelebSet, Pair, Recording, load_cryceleb
from cryid.models.evaluation.embedders import EmbeddingCache, EvalEmbedder, Throughput, file_fingerprint
from cryid.models.evaluation.metrics import bootstrap_ci, eer, infant_codes, min_dcf, weighted_eer
from cryid.models.evaluation.options import EvalOptions
from cryid.models.evaluation.ward_eval import (
    WardReport,
    channel_key,
    file_expiration_embeddings,
    load_recording,
    progress,
    ward_protocol,
)
from cryid.models.scoring import cosine_matrix, l2_normalize

__all__ = [
    "EvalOptions",
    "EvalReport",
    "PairReport",
    "WardReport",
    "concatenation_embeddings",
    "file_expiration_embeddings",
    "pair_protocol",
    "run_evaluation",
    "ward_protocol",
]

logger = logging.getLogger(__name__)

GroupKey = tuple[str, str]  # (baby_id, period)


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
    eer_ci: tuple[float, float] | None
    eer_channel_matched_ci: tuple[float, float] | None
    pair_ids: list[str] = field(repr=False)
    scores: list[float] = field(repr=False)
    label_values: list[int | None] = field(repr=False)


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
    embedder: EvalEmbedder,
    cache: EmbeddingCache,
    meter: Throughput,
    order: int = -1,
    seed: int = 0,
    channel: WardChannel | None = None,
) -> np.ndarray:
    """One embedding per (baby, period) in ``keys``: its files concatenated (order -1: chronological)."""
    out = []
    for key in progress(keys, f"embedding {len(keys)} concatenations", len(keys)):
        recs = _orders(groups[key], order, seed, key)

        def compute(recs: list[Recording] = recs) -> np.ndarray:
            wav = np.concatenate([load_recording(r, embedder.sample_rate, channel) for r in recs])
            meter.start()
            emb = embedder.embed(wav, embedder.sample_rate)
            meter.stop(len(wav) / embedder.sample_rate)
            return emb

        fingerprint = "|".join(file_fingerprint(r.path) for r in recs)
        key = f"concat|{embedder.sample_rate}|{fingerprint}{channel_key(channel)}"
        out.append(cache.get_or_compute(key, compute))
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


def pair_eer_ci(
    b_ids: list[str], d_ids: list[str], scores: np.ndarray, labels: np.ndarray, resamples: int, seed: int
) -> tuple[float, float] | None:
    """Bootstrap 95% interval of the pairs' EER over infants: a resample draws infants with replacement;
    a pair counts (multiplicity of its B infant) x (multiplicity of its D infant) times, a same-infant
    pair once per draw of the infant (never two copies of one infant as an impostor pair)."""
    if not resamples or scores.size == 0:
        return None
    codes, n = infant_codes(list(b_ids) + list(d_ids))
    cb, cd = codes[: len(b_ids)], codes[len(b_ids) :]
    pos, neg = labels == 1, labels == 0
    same = cb == cd

    def stat(counts: np.ndarray) -> float | None:
        w = np.where(same, counts[cb], counts[cb] * counts[cd])
        return weighted_eer(scores[pos], scores[neg], w[pos], w[neg])

    return bootstrap_ci(n, stat, resamples, seed)


def pair_protocol(
    data: CryCelebSet,
    split: str,
    pairs: list[Pair],
    embedder: EvalEmbedder,
    cache: EmbeddingCache,
    meter: Throughput,
    options: EvalOptions,
    channel: WardChannel | None = None,
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
            concatenation_embeddings(
                cohort_groups, list(cohort_groups), embedder, cache, meter, channel=channel
            )
        )
    orders = [-1] if options.tta == 1 else list(range(options.tta))
    total = np.zeros(len(pairs), dtype=np.float64)
    for order in orders:
        emb_b = l2_normalize(
            concatenation_embeddings(groups, b_keys, embedder, cache, meter, order, options.seed, channel)
        )
        emb_d = l2_normalize(
            concatenation_embeddings(groups, d_keys, embedder, cache, meter, order, options.seed, channel)
        )
        # float32 cosines, as the notebook's torch.nn.CosineSimilarity(...).item(), then float64
        raw = np.einsum("ij,ij->i", emb_b[ib], emb_d[id_]).astype(np.float32).astype(np.float64)
        if cohort is not None:
            raw = as_norm(raw, emb_b[ib], emb_d[id_], cohort, options.cohort_top_k)
        total += raw
    scores = total / len(orders)
    labels = [p.label for p in pairs]
    has_labels = all(lab is not None for lab in labels)
    result = dict.fromkeys(
        (
            "eer",
            "threshold",
            "min_dcf",
            "min_dcf_threshold",
            "eer_channel_matched",
            "eer_ci",
            "eer_channel_matched_ci",
        )
    )
    b_ids, d_ids = [p.baby_id_b for p in pairs], [p.baby_id_d for p in pairs]
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
        result.update(
            eer=ver[0],
            threshold=ver[1],
            min_dcf=ver[2],
            min_dcf_threshold=ver[3],
            eer_ci=pair_eer_ci(b_ids, d_ids, scores, lab, options.bootstrap, options.seed),
        )
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
            if ver_m is not None:
                m = np.flatnonzero(matched)
                result["eer_channel_matched_ci"] = pair_eer_ci(
                    [b_ids[i] for i in m],
                    [d_ids[i] for i in m],
                    scores[m],
                    lab[m],
                    options.bootstrap,
                    options.seed,
                )
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
    ward_channel: str | None
    throughput: dict[str, dict[str, float | int | None]]
    cache: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "data": self.data,
            "split": self.split,
            "backend": self.backend,
            "model": self.model,
            "model_sha256": self.model_sha256,
            "ward_channel": self.ward_channel,
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
    embedder: EvalEmbedder,
    embedder_name: str,
    model_label: str,
    segmenter: SegmenterSettings,
    cache_dir: Path | None,
    rule: NamingThresholds | None = None,
) -> EvalReport:
    """Read the data set, run the chosen protocols, return the report (writes nothing but cache entries).
    The ward protocol decides as the daemon does: with the embedder's calibration
    (``embedder.manifest.calibration``), if any, under ``rule``, the daemon's thresholds
    (``settings.identifier``); without a rule it reports no decisions."""
    data = load_cryceleb(data_dir)
    if not data.split_recordings(options.split):
        raise CryCelebError(
            f"{data.root}/metadata.csv: no recordings in split {options.split!r}; pick another split"
        )
    pairs = data.read_pairs(options.split) if options.protocol in ("pairs", "both") else None
    data.check_audio(options.split)
    cache = EmbeddingCache(cache_dir, embedder.sha256)
    rate = embedder.sample_rate
    channel = None if options.ward_channel is None else WardChannel(options.ward_channel, rate)
    calibration = getattr(getattr(embedder, "manifest", None), "calibration", None)
    meters = {"pairs": Throughput(), "ward": Throughput()}
    pair_report = ward_report = None
    if pairs is not None:
        pair_report = pair_protocol(
            data, options.split, pairs, embedder, cache, meters["pairs"], options, channel
        )
    if options.protocol in ("ward", "both"):
        ward_report = ward_protocol(
            data,
            options.split,
            embedder,
            segmenter,
            cache,
            meters["ward"],
            options,
            calibration,
            channel,
            rule,
        )
    return EvalReport(
        data=str(data.root),
        split=options.split,
        backend=embedder_name,
        model=model_label,
        model_sha256=embedder.sha256,
        pairs=pair_report,
        ward=ward_report,
        ward_channel=None if channel is None else channel.describe(),
        throughput={k: m.as_dict() for k, m in meters.items() if m.items},
        cache={
            "dir": None if cache.root is None else str(cache.root),
            "hits": cache.hits,
            "misses": cache.misses,
        },
    )
