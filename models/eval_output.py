"""What ``cryid eval`` writes: the summary lines, ``--json``, ``--submission`` CSV and the ``--plot`` PNG.

Files are written to a temporary name and renamed into place, so nothing is ever half-written.
matplotlib (the ``plot`` extra) is imported only when a plot is asked for.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cryid.models.errors import CryidError
from cryid.models.evaluate import EvalReport, PairReport

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


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(report: EvalReport, path: Path) -> None:
    _atomic_write_bytes(path, (json.dumps(report.to_json(), indent=2) + "\n").encode("utf-8"))


def write_submission(pairs: PairReport, path: Path) -> None:
    """``id,score`` for every pair, the CryCeleb2023 challenge's submission format."""
    lines = ["id,score", *(f"{i},{s:.8f}" for i, s in zip(pairs.pair_ids, pairs.scores, strict=True))]
    _atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))


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
    """Score histograms: the paper protocol's pairs and, when run, the ward protocol's file-vs-baby scores."""
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
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (pos, neg, thr, title) in zip(axes[0], panels, strict=True):
        _histogram(ax, pos, neg, thr, title)
    fig.suptitle(f"{report.backend} {report.model_sha256[:12]} on {Path(report.data).name}")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


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
                f"  EER {_pct(pr.eer)} at threshold {pr.threshold:.4f}, minDCF {pr.min_dcf:.4f}, "
                f"{pr.positive_pairs} positive pairs"
            )
            if pr.channel_matched_pairs is not None:
                lines.append(
                    f"  channel-matched EER {_pct(pr.eer_channel_matched)}, {pr.channel_matched_pairs} pairs"
                )
        else:
            lines.append(
                "  the pairs file has no label column: EER skipped; write the scores with --submission FILE"
            )
    wr = report.ward
    if wr is not None:
        lines.append(
            f"ward protocol (enroll from B files, identify each D file): {wr.enrolled} babies enrolled, "
            f"{wr.queries} D files identified"
        )
        lines.append(
            f"  no expiration found in {wr.b_files_without_expirations} B files "
            f"({len(wr.babies_not_enrolled)} babies not enrolled), {wr.d_files_without_expirations} D files; "
            f"{wr.unenrolled_queries} D files of unenrolled babies scored as impostors only"
        )
        lines.append(f"  top-1 {_pct(wr.top1)}, top-5 {_pct(wr.top5)}, open-set EER {_pct(wr.eer)}")
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
