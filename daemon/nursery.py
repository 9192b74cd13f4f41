"""Nursery audio for the demo, tests and benchmark: real cries when present, else generated ones.

Generated cries imitate the structure of an infant cry (not its identity): bouts of expirations
(0.5-1.0 s, harmonic, with an arched pitch contour, vibrato and a formant-like spectral envelope)
separated by short inspirations. Each synthetic "baby" has its own fundamental frequency, contour
and spectral envelope, so the model can tell them apart. A nursery stream concatenates bouts of
several babies with room noise between them and records the ground truth (who cried when).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryid.models.audio import SAMPLE_RATE, load_audio

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Voice:
    """Parameters of one generated baby."""

    f0_hz: float
    arch: float  # relative pitch rise in the middle of an expiration
    vibrato_hz: float
    formant_hz: float
    tilt: float  # harmonic amplitude decay exponent


def voices(n: int, seed: int = 0) -> list[Voice]:
    """``n`` clearly different voices (f0 spread over 300-1100 Hz, distinct envelopes)."""
    rng = np.random.default_rng(seed)
    f0s = np.geomspace(300.0, 1100.0, n) if n > 1 else np.array([450.0])
    order = rng.permutation(n)
    return [
        Voice(
            f0_hz=float(f0s[i]),
            arch=float(rng.uniform(0.05, 0.35)),
            vibrato_hz=float(rng.uniform(4.0, 12.0)),
            formant_hz=float(rng.uniform(900.0, 3500.0)),
            tilt=float(rng.uniform(0.6, 1.8)),
        )
        for i in order
    ]


def expiration(
    voice: Voice, seconds: float, rng: np.random.Generator, level_dbfs: float = -18.0
) -> np.ndarray:
    """One voiced expiration."""
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    x = np.linspace(0.0, 1.0, n)
    f0 = voice.f0_hz * rng.uniform(0.93, 1.07)
    contour = (
        f0 * (1.0 + voice.arch * np.sin(np.pi * x)) * (1.0 + 0.02 * np.sin(2 * np.pi * voice.vibrato_hz * t))
    )
    phase = 2 * np.pi * np.cumsum(contour) / SAMPLE_RATE
    out = np.zeros(n)
    for k in range(1, 40):
        fk = k * contour
        amp = (k**-voice.tilt) * (1.0 + 3.0 * np.exp(-(((fk - voice.formant_hz) / 400.0) ** 2)))
        amp = np.where(fk < SAMPLE_RATE / 2 - 200, amp, 0.0)
        out += amp * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    out += 0.02 * rng.standard_normal(n)  # breathiness
    env = np.minimum(1.0, np.minimum(x / 0.08, (1.0 - x) / 0.15)) ** 0.7
    out *= env
    rms = np.sqrt(np.mean(out**2)) + 1e-12
    return (out / rms * 10 ** (level_dbfs / 20)).astype(np.float32)


def room_noise(seconds: float, rng: np.random.Generator, level_dbfs: float = -60.0) -> np.ndarray:
    """Quiet, slightly low-passed noise (ventilation, the ward)."""
    n = int(seconds * SAMPLE_RATE)
    w = rng.standard_normal(n + 8)
    noise = np.convolve(w, np.ones(8) / 8, mode="valid")[:n]
    rms = np.sqrt(np.mean(noise**2)) + 1e-12
    return (noise / rms * 10 ** (level_dbfs / 20)).astype(np.float32)


def bout(voice: Voice, seconds: float, seed: int) -> np.ndarray:
    """A crying bout of about ``seconds``: expirations with short inspiration pauses, in room noise."""
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    total = 0
    while total < seconds * SAMPLE_RATE:
        e = expiration(voice, float(rng.uniform(0.5, 1.0)), rng, level_dbfs=float(rng.uniform(-22, -14)))
        pause = room_noise(float(rng.uniform(0.3, 0.5)), rng)
        parts += [e, pause]
        total += e.size + pause.size
    return np.concatenate(parts)


@dataclass(frozen=True)
class Truth:
    """Who cried from ``start_s`` to ``end_s`` of a nursery stream (None: a baby nobody enrolled)."""

    baby_id: str | None
    start_s: float
    end_s: float


def nursery_stream(
    bouts: list[tuple[str | None, np.ndarray]], gap_s: float = 6.0, seed: int = 0
) -> tuple[np.ndarray, list[Truth]]:
    """Bouts separated by ``gap_s`` of room noise (longer than an episode gap), with the ground truth."""
    rng = np.random.default_rng(seed)
    parts = [room_noise(gap_s / 2, rng)]
    truth: list[Truth] = []
    pos = parts[0].size
    for baby_id, wav in bouts:
        truth.append(Truth(baby_id, pos / SAMPLE_RATE, (pos + wav.size) / SAMPLE_RATE))
        gap = room_noise(gap_s, rng)
        parts += [wav, gap]
        pos += wav.size + gap.size
    return np.concatenate(parts), truth


@dataclass(frozen=True)
class RealBaby:
    """A real infant's recordings: ``birth`` from its first session (for enrollment), ``later`` from a
    later session (the cries the ward hears), so enrollment and identification never share a recording."""

    baby_id: str
    birth: list[np.ndarray]
    later: list[np.ndarray]


def real_cries(
    dac_dir: Path, n_babies: int, seed: int | None = None, channel: str | None = None
) -> list[RealBaby]:
    """Up to ``n_babies`` dev-split infants that have both a B and a D session, read from a
    CryCeleb-layout folder such as ``../shared/data/donateacry-cc``: in id order, or shuffled by ``seed``.
    ``channel``: only infants recorded through this channel (``provenance.csv``'s ``recording``, e.g.
    ``ios-ima4-16k``), when the folder has that file. At most 4 B and 2 D recordings each."""
    by_baby: dict[str, dict[str, list[str]]] = {}
    codec: dict[str, str] = {}
    if channel is not None and (dac_dir / "provenance.csv").is_file():
        with open(dac_dir / "provenance.csv", newline="") as fh:
            codec = {r["file_id"]: r["recording"] for r in csv.DictReader(fh)}
    with open(dac_dir / "metadata.csv", newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: (r["baby_id"], r["period"], r["file_name"]))
    for r in rows:
        if codec and codec.get(r["file_id"]) != channel:
            continue
        if r["split"] == "dev" and r["period"] in ("B", "D"):
            by_baby.setdefault(r["baby_id"], {}).setdefault(r["period"], []).append(r["file_name"])
    chosen = [b for b, p in by_baby.items() if p.get("B") and p.get("D")]
    if seed is not None:
        chosen = [chosen[i] for i in np.random.default_rng(seed).permutation(len(chosen))]
    return [
        RealBaby(
            b,
            [load_audio(dac_dir / f) for f in by_baby[b]["B"][:4]],
            [load_audio(dac_dir / f) for f in by_baby[b]["D"][:2]],
        )
        for b in chosen[:n_babies]
    ]


def split_later(recordings: list[np.ndarray], frame_ms: float = 20.0) -> tuple[np.ndarray, np.ndarray]:
    """A baby's later cries in two parts that share no recording where it can: the first recording and
    the rest; a single recording is cut in two at the quietest frame of its middle third (a pause
    between expirations), so no expiration is in both parts."""
    if not recordings:
        raise ValueError("split_later: no recordings")
    if len(recordings) > 1:
        return recordings[0], np.concatenate(recordings[1:])
    wav = recordings[0]
    frame = max(1, int(SAMPLE_RATE * frame_ms / 1000))
    n = wav.size // frame
    if n < 3:
        raise ValueError(f"split_later: a recording of {wav.size} samples is too short to cut in two")
    rms = np.sqrt(np.mean(np.square(wav[: n * frame].reshape(n, frame), dtype=np.float64), axis=1))
    lo, hi = n // 3, max(n // 3 + 1, 2 * n // 3)
    cut = (lo + int(np.argmin(rms[lo:hi]))) * frame + frame // 2
    return wav[:cut], wav[cut:]


def enroll(
    registry: Any, embedder: Any, settings: Any, baby_id: str, recordings: list[np.ndarray], room: str
) -> Any:
    """Enroll ``baby_id`` from in-memory recordings through ``cryid.enrollment`` (segment, embed, store)."""
    from cryid.enrollment import enroll as enrollment

    samples = []
    for i, wav in enumerate(recordings):
        try:
            samples.append(
                enrollment.prepare_recording(
                    wav,
                    source_kind="file",
                    source=f"{baby_id}-{i}.wav",
                    period="birth",
                    segmenter=settings.segmenter,
                    embedder=embedder,
                    keep_audio=False,
                )
            )
        except enrollment.EnrollmentError as exc:  # a recording without cry: use the others
            logger.info("%s", exc)
    if not samples:
        raise enrollment.EnrollmentError(f"{baby_id}: no recording holds a detectable cry")
    return enrollment.add(registry, baby_id, samples, settings.registry, room=room, replace=True)
