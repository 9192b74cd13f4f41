"""What ``cryid eval`` writes: the summary lines, ``--json``, ``--submission`` CSV and the ``--plot`` PNG.

Files are written to a temporary name and renamed into place, so nothing is ever half-written.
matplotlib (the ``plot`` extra) is imported only when a plot is asked for.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from cryid.models.errors import CryidError
from cryid.models.evaluation.evaluate import EvalReport, PairReport, WardReport
from cryid.models.files import atomic_write

logger = logging.getLogger(__name__)


class OutputError(CryidError):
    """An output that cannot be written; the message names the problem and the fix."""


def check_output_path(path: Path, option: str) -> None:
    """Fail before any work when ``path`` cannot be written (missing folder, a directory)."""
    if path.is_dir():
        raise OutputError(f"{option} {path}: is a directory; give a file name")
    if not path.parent.is_dir():
        raise OutputError(f"{option} {path}: folder {path.parent} does not exist; create it first")


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise OutputError(
            "--plot needs matplotlib, which is not installed; pip install 'cryid[plot]'"
        ) from None


def write_json(report: EvalReport, path: Path) -> None:
    atomic_write(path, json.dumps(report.to_json(), indent=2) + "\n", private=True)


def write_submission(pairs: PairReport, path: Path) -> None:
    """``id,score`` for every pair, the CryCeleb2023 challenge's submission format."""
    lines = ["id,score", *(f"{i},{s:.8f}" for i, s in zip(pairs.pair_ids, pairs.scores, strict=True))]
    atomic_write(path, "\n".join(lines) + "\n", private=True)


def _histogram(ax: Any, pos: np.ndarray, neg: np.ndarray, threshold: float | None, title: str) -> None:
    """Per-class percentage histograms on shared bins, like the paper's Figure 4 / the notebook's plot."""
    both = np.concatenate([pos, neg])
    bins = np.histogram_bin_edges(both, bins=min(40, max(10, both.size // 20)))
    for scores, label in ((neg, "different baby (0)"), (pos, "same baby (1)")):
        weights = np.full(scores.size, 100.0 / max(1, scores.size))
        ax.hist(scores, bins=bins, weights=weights, alpha=0.6, label=label)
    if threshold is not None:
        ax.axvline(threshold, color="red", ls="--", label="EER threshold")
    ax.set_xlabel("score")
    ax.set_ylabel("percent of pairs in class")
    ax.set_title(title)
    ax.legend()


def plot_scores(report: EvalReport, path: Path) -> None:
    """Score histograms: the paper protocol's pairs and, when run, the ward protocol's file-vs-baby scores;
    for a calibrated model also the ward's coverage against wrong-baby rate over min_confidence."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    pr = report.pairs
    if pr is not None and pr.labels:
        lab = np.array(pr.label_values)
        scores = np.array(pr.scores)
        panels.append(
            (
                scores[lab == 1],
                scores[lab == 0],
                pr.threshold,
                f"{report.split} pairs: EER={pr.eer:.4f} - Thresh={pr.threshold:.4f}",
            )
        )
    wr = report.ward
    if wr is not None and wr.eer is not None:
        panels.append(
            (
                np.array(wr.target_scores),
                np.array(wr.nontarget_scores),
                None,
                f"ward: D file vs baby, EER={wr.eer:.4f}",
            )
        )
    if not panels:
        raise OutputError("--plot: no labelled scores to plot (the pairs file has no label column)")
    curve = wr.operating_curve if wr is not None else None
    n = len(panels) + (curve is not None)
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.5), squeeze=False)
    for ax, (pos, neg, thr, title) in zip(axes[0], panels, strict=False):
        _histogram(ax, pos, neg, thr, title)
    if wr is not None and curve is not None:
        plot_operating_curve(axes[0][-1], curve, wr.min_confidence, "ward: coverage vs wrong baby")
    fig.suptitle(f"{report.backend} {report.model_sha256[:12]} on {Path(report.data).name}")
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), private=True)
    finally:
        plt.close(fig)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _ci(ci: tuple[float, float] | list[float] | None) -> str:
    """`` [low-high%]``: a bootstrap 95% interval printed next to its figure."""
    return "" if ci is None else f" [{100 * ci[0]:.1f}-{100 * ci[1]:.1f}%]"


def summary_lines(report: EvalReport) -> list[str]:
    """Human-readable summary for the terminal (figures as percentages; the JSON holds fractions)."""
    lines = [
        f"cryid eval: {report.data} split {report.split}, {report.backend} model {report.model} "
        f"(sha256 {report.model_sha256[:12]})"
    ]
    pr = report.pairs
    if pr is not None:
        extra = f", TTA {pr.tta} orders" if pr.tta > 1 else ""
        if pr.score_norm != "none":
            extra += f", {pr.score_norm} against {pr.cohort_size} cohort embeddings"
        lines.append(f"paper protocol (concatenate each baby-period, cosine B vs D){extra}: {pr.pairs} pairs")
        if pr.labels:
            lines.append(
                f"  EER {_pct(pr.eer)}{_ci(pr.eer_ci)} at threshold {pr.threshold:.4f}, "
                f"minDCF {pr.min_dcf:.4f}, "
                f"{pr.positive_pairs} positive pairs"
            )
            if pr.channel_matched_pairs is not None:
                lines.append(
                    f"  channel-matched EER {_pct(pr.eer_channel_matched)}{_ci(pr.eer_channel_matched_ci)}, "
                    f"{pr.channel_matched_pairs} pairs"
                )
        else:
            lines.append(
                "  the pairs file has no label column: EER skipped; write the scores with --submission FILE"
            )
    if report.ward_channel is not None:
        lines.append(f"every recording through the simulated {report.ward_channel}")
    wr = report.ward
    if wr is not None:
        rooms = wr.rooms
        where = (
            ""
            if rooms is None
            else f" in {rooms['count']} seeded rooms of {rooms['size']} babies "
            f"({rooms['size'] - rooms['strangers']} enrolled, {rooms['strangers']} strangers, seed "
            f"{rooms['seed']})"
        )
        confirm = (
            f", {wr.confirm} D files per baby confirmed (confirmed_weight {wr.confirmed_weight:g})"
            if wr.confirm
            else ""
        )
        lines.append(
            f"ward protocol (enroll from B files, identify each D file){where}{confirm}: "
            f"{wr.enrolled} babies enrollable, {wr.queries} queries of enrolled babies "
            f"from {wr.infants} crying infants"
        )
        lines.append(
            f"  no expiration found in {wr.b_files_without_expirations} B files "
            f"({len(wr.babies_not_enrolled)} babies not enrolled), {wr.d_files_without_expirations} D files; "
            f"{wr.unenrolled_queries} queries of babies not enrolled (strangers: only 'unknown' is right)"
        )
        lines.append(
            f"  top-1 {_pct(wr.top1)}{_ci(wr.top1_ci)}, top-5 {_pct(wr.top5)}{_ci(wr.top5_ci)}, "
            f"open-set EER {_pct(wr.eer)}{_ci(wr.eer_ci)}"
        )
        if not wr.calibrated:
            lines.append(
                "  no calibration in the model: no decisions (cryid model calibrate MODEL --data DIR)"
            )
        else:
            lines.extend(decision_lines(wr))
    for name, tp in report.throughput.items():
        rate = tp["audio_s_per_wall_s"]
        lines.append(
            f"throughput ({name}, {report.backend}): {tp['audio_s']:.1f} s of audio embedded in "
            f"{tp['wall_s']:.1f} s = {rate if rate is not None else 'n/a'} s of audio per second"
        )
    if report.cache["dir"] is not None:
        lines.append(
            f"cache: {report.cache['hits']} embeddings reused, {report.cache['misses']} computed "
            f"({report.cache['dir']})"
        )
    return lines


def decision_lines(wr: WardReport) -> list[str]:
    """The ward's decisions under the daemon's rule (and the labelled what-if) of a calibrated model."""
    if wr.min_confidence is None or wr.min_confidence_unconfirmed is None:
        return ["  no decision rule given: no coverage or wrong-baby rate"]
    rule = f"{wr.min_confidence_from} {wr.min_confidence}, identifier.min_confidence_unconfirmed "
    rule += f"{wr.min_confidence_unconfirmed}"
    rule += "".join(
        f", identifier.{k} {v}"
        for k, v in (("min_score", wr.min_score), ("min_margin", wr.min_margin))
        if v is not None
    )
    lines = [
        f"  as the daemon decides ({rule}): coverage {_pct(wr.coverage)}{_ci(wr.coverage_ci)} of enrolled "
        f"babies' queries named, wrong baby {_pct(wr.wrong_rate)}{_ci(wr.wrong_rate_ci)} of {wr.named} named"
    ]
    if wr.confirm == 0 and wr.min_confidence_unconfirmed >= 1.0:
        lines.append(
            "  no baby has a confirmed cry: the daemon names none "
            f"(identifier.min_confidence_unconfirmed {wr.min_confidence_unconfirmed})"
        )
    rec = wr.recommended_min_confidence
    if rec is not None and rec != wr.min_confidence:
        lines.append(
            f"  (the model's calibration recommends min_confidence {rec:g}; the daemon does not read it)"
        )
    what_if = wr.what_if_unconfirmed_at_min_confidence
    if what_if is not None and what_if["named"] != wr.named:
        lines.append(
            f"  what-if, NOT the daemon's decision (babies without a confirmed cry named at min_confidence "
            f"{wr.min_confidence} too): coverage {_pct(what_if['coverage'])}{_ci(what_if['coverage_ci'])}, "
            f"wrong baby {_pct(what_if['wrong_rate'])}{_ci(what_if['wrong_rate_ci'])} "
            f"of {what_if['named']} named"
        )
    return lines


def plot_operating_curve(
    ax: Any, curve: list[dict[str, float | None]], chosen: float | None, title: str
) -> None:
    """Coverage against wrong-baby rate over min_confidence, the chosen operating point marked."""
    pts = [
        (c["wrong_rate"], c["coverage"], c["min_confidence"])
        for c in curve
        if c["wrong_rate"] is not None and c["coverage"] is not None
    ]
    if not pts:
        ax.set_title(f"{title}: nothing named at any min_confidence")
        return
    w, cov, t = (np.array(x, dtype=np.float64) for x in zip(*pts, strict=True))
    ax.plot(100 * w, 100 * cov, marker=".", lw=1)
    for i in range(0, len(t), 10):
        ax.annotate(f"{t[i]:.2f}", (100 * w[i], 100 * cov[i]), fontsize=7)
    if chosen is not None:
        i = int(np.argmin(np.abs(t - chosen)))
        ax.plot(100 * w[i], 100 * cov[i], "ro", label=f"min_confidence {chosen:g}")
        ax.legend()
    ax.axvline(5, color="grey", ls=":", lw=1)
    ax.set_xlabel("wrong baby, % of named")
    ax.set_ylabel("coverage, % of enrolled babies' queries named")
    ax.set_title(title)


def calibration_lines(result: Any) -> list[str]:
    """What ``cryid model calibrate`` prints (``result``: ``calibrate.CalibrationResult``)."""
    cal = result.calibration
    m = cal.metrics
    lines = [
        f"{result.manifest_path}: calibration written ({cal.n_queries} room queries, "
        f"{result.infants} infants)",
        "  map: p = sigmoid("
        + " + ".join(f"{c:.3f} {f}" for c, f in zip(cal.coef, cal.features, strict=True))
        + f" + {cal.intercept:.3f}); candidates' temperature {cal.temperature:.3f}",
        "  confirmed_weight by CV log loss of K=1 queries: "
        + ", ".join(f"{w:g}: {loss:.4f}" for w, loss in result.weight_log_loss.items())
        + f" -> {cal.confirmed_weight:g}",
        f"  CV log loss {m['cv_log_loss']:.4f}, ECE {m['cv_ece']:.4f}; mean confidence "
        f"{m['cv_mean_confidence']:.3f} vs observed {m['cv_base_rate']:.3f}",
        "  reliability (CV, predicted -> observed, queries): "
        + "; ".join(f"{b.predicted:.2f}->{b.observed:.2f} ({b.count})" for b in result.reliability),
        f"  recommended min_confidence {m['recommended_min_confidence']:g} (lowest with CV wrong-baby rate "
        f"<= {100 * m['target_wrong_rate']:g}% from there on, K=0 and K=1)",
    ]
    for op in result.operating:
        lines.append(
            f"  rooms of {cal.room_size}, K={op.confirm}: top-1 {_pct(op.top1)}; at {op.min_confidence:g}: "
            f"coverage {_pct(op.coverage)}{_ci(op.coverage_ci)}, wrong baby {_pct(op.wrong_rate)}"
            f"{_ci(op.wrong_rate_ci)} of {op.named} named ({op.queries} queries)"
        )
    for k, curve in result.curves.items():
        pts = [f"{t:g}: {_pct(c)}/{_pct(w)}" for t, c, w, _ in curve if round(t * 100) % 10 == 0]
        lines.append(f"  K={k} coverage/wrong by min_confidence: " + ", ".join(pts))
    return lines
