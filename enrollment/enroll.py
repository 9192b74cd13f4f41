"""Enrollment operations as a library: prepare recordings, add, update, remove, re-embed, show, list.

Used by ``cryid enroll`` and by the daemon's demo. Every recording goes through the one file path of
``cryid.models.pipeline.embed_expirations`` (the daemon's segmenter and embedder). Bad input raises
``EnrollmentError`` (a ``ValueError``) before anything is written; each write is one transaction.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cryid.enrollment.config import RegistrySettings
from cryid.enrollment.episodes import Feedback
from cryid.enrollment.registry import (
    Infant,
    NewSample,
    Registry,
    RegistryError,
    SampleEmbeddings,
    SampleInfo,
    check_baby_id,
)
from cryid.enrollment.sqlite_files import usable_vector
from cryid.models.audio import SAMPLE_RATE, load_audio
from cryid.models.config import SegmenterSettings
from cryid.models.files import sha256_file
from cryid.models.scoring import centroid, cosine_matrix

if TYPE_CHECKING:
    from cryid.models.embedder import Embedder

logger = logging.getLogger(__name__)


class EnrollmentError(RegistryError):
    """An enrollment that cannot be done as asked; the message names the problem and the fix."""


# ------------------------------------------------------------------------------------- model identity
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def model_sha256(model_dir: Path) -> str:
    """sha256 of ``model_dir/model.onnx`` (what ``Embedder.sha256`` reports), without loading the model."""
    path = Path(model_dir) / "model.onnx"
    try:
        st = path.stat()
    except OSError as exc:
        raise EnrollmentError(
            f"model {path} not found; set CRYID_MODEL to a directory with model.onnx"
        ) from exc
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


# ------------------------------------------------------------------------------------- kept audio
def encode_flac(wav: np.ndarray) -> bytes:
    """16 kHz mono audio as 16-bit FLAC bytes (only stored with --keep-audio)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(wav, -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def decode_flac(data: bytes) -> np.ndarray:
    import soundfile as sf

    try:
        wav, sr = sf.read(io.BytesIO(data), dtype="float32")
    except (RuntimeError, TypeError, ValueError) as exc:  # libsndfile: not FLAC, truncated, garbage
        raise EnrollmentError(f"kept audio does not decode ({exc}); re-enroll the baby") from None
    if sr != SAMPLE_RATE:
        raise EnrollmentError(f"kept audio has sample rate {sr}, expected {SAMPLE_RATE}; re-enroll the baby")
    return wav


# ------------------------------------------------------------------------------------- preparing samples
def embed_recording(wav: np.ndarray, segmenter: SegmenterSettings, embedder: Embedder) -> SampleEmbeddings:
    """Segment and embed one recording (the daemon's path); raises if it holds no cry."""
    from cryid.models.pipeline import embed_expirations

    items = embed_expirations(wav, segmenter, embedder)
    if not items:
        raise EnrollmentError("no cry detected")
    return SampleEmbeddings(
        model_sha256=embedder.sha256,
        vectors=np.stack([np.asarray(it.embedding, dtype=np.float32) for it in items]),
        start_samples=tuple(int(it.expiration.start_sample) for it in items),
        end_samples=tuple(int(it.expiration.end_sample) for it in items),
    )


def cry_seconds(emb: SampleEmbeddings) -> float:
    return float(sum(e - s for s, e in zip(emb.start_samples, emb.end_samples, strict=True)) / SAMPLE_RATE)


def prepare_recording(
    wav: np.ndarray,
    *,
    source_kind: str,
    source: str,
    period: str,
    segmenter: SegmenterSettings,
    embedder: Embedder,
    keep_audio: bool,
) -> NewSample:
    """One recording (16 kHz mono float32) -> a sample ready to be written."""
    duration_s = len(wav) / SAMPLE_RATE
    try:
        emb = embed_recording(wav, segmenter, embedder)
    except EnrollmentError:
        raise EnrollmentError(
            f"{source}: no cry detected in {duration_s:.1f} s of audio; "
            "use a recording of the baby crying near the microphone"
        ) from None
    return NewSample(
        source_kind=source_kind,
        source=source,
        period=period,
        duration_s=duration_s,
        cry_s=cry_seconds(emb),
        n_expirations=len(emb.start_samples),
        embeddings=emb,
        audio_flac=encode_flac(wav) if keep_audio else None,
    )


def load_files(paths: Sequence[Path]) -> list[tuple[str, np.ndarray]]:
    """Read every file (name, 16 kHz mono audio) before any embedding, so bad input fails fast.

    A recording given twice (the same audio, whatever the file name or format) counts once: the
    repeats are dropped with a warning, so they cannot make up ``registry.min_cry_s``.
    """
    if not paths:
        raise EnrollmentError("no audio files given; name one or more WAV/FLAC recordings")
    for p in paths:
        if not Path(p).is_file():
            raise EnrollmentError(f"{p}: no such file; check the path")
    loaded: list[tuple[str, np.ndarray]] = []
    seen: dict[str, str] = {}
    for p in paths:
        wav = load_audio(p)
        digest = hashlib.sha256(np.ascontiguousarray(wav, dtype="<f4").tobytes()).hexdigest()
        if digest in seen:
            logger.warning("%s is the same recording as %s (identical audio): counted once", p, seen[digest])
            continue
        seen[digest] = str(p)
        loaded.append((Path(p).name, wav))
    return loaded


def prepare_files(
    paths: Sequence[Path],
    *,
    period: str,
    segmenter: SegmenterSettings,
    embedder_factory: Callable[[], Embedder],
    keep_audio: bool,
) -> list[NewSample]:
    """Read, segment and embed each file; every file must be audio holding some cry.

    The embedder is built (``embedder_factory()``) only once every file has been read.
    """
    loaded = load_files(paths)
    embedder = embedder_factory()
    return [
        prepare_recording(
            wav, source_kind="file", source=name, period=period, segmenter=segmenter,
            embedder=embedder, keep_audio=keep_audio,
        )
        for name, wav in loaded
    ]


def check_min_cry(samples: Sequence[NewSample], settings: RegistrySettings) -> float:
    total = float(sum(s.cry_s for s in samples))
    n = sum(s.n_expirations for s in samples)
    if total < settings.min_cry_s:
        raise EnrollmentError(
            f"found {total:.1f} s of cry in {n} expirations, enrollment needs at least "
            f"{settings.min_cry_s:.1f} s (registry.min_cry_s); record more crying or add more files"
        )
    return total


# ------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Confusable:
    baby_id: str
    similarity: float


@dataclass(frozen=True)
class EnrollResult:
    baby_id: str
    n_samples: int
    cry_s: float
    n_expirations: int
    model_sha256: str
    replaced: bool
    confusable: tuple[Confusable, ...]


def _similar_babies(
    registry: Registry, baby_id: str, model_sha: str, threshold: float
) -> tuple[Confusable, ...]:
    cents = registry.centroids(model_sha)
    if baby_id not in cents:
        return ()
    others = sorted(b for b in cents if b != baby_id)
    if not others:
        return ()
    sims = cosine_matrix(cents[baby_id], np.stack([cents[b] for b in others]))[0]
    found = [Confusable(b, float(s)) for b, s in zip(others, sims, strict=True) if s >= threshold]
    for c in found:
        logger.info("%s is %.3f similar to %s: the daemon may confuse them", baby_id, c.similarity, c.baby_id)
    return tuple(sorted(found, key=lambda c: -c.similarity))


def _model_of(samples: Sequence[NewSample]) -> str:
    shas = {s.embeddings.model_sha256 for s in samples if s.embeddings is not None}
    if len(shas) != 1:
        raise EnrollmentError("samples of one enrollment must be embedded with one model")
    return shas.pop()


# ------------------------------------------------------------------------------------- operations
def ensure_can_add(registry: Registry, baby_id: str, replace: bool) -> None:
    """Fail fast (before embedding) when ``add`` would be refused."""
    check_baby_id(baby_id)
    if not replace and registry.get_infant(baby_id) is not None:
        raise EnrollmentError(
            f"baby {baby_id!r} is already enrolled; use `cryid enroll update` to add samples "
            "or `add --replace` to start over"
        )


def add(
    registry: Registry,
    baby_id: str,
    samples: Sequence[NewSample],
    settings: RegistrySettings,
    *,
    room: str,
    display_name: str = "",
    replace: bool = False,
) -> EnrollResult:
    """Enroll a new baby (or, with ``replace``, start an enrolled one over) in one transaction."""
    ensure_can_add(registry, baby_id, replace)
    total = check_min_cry(samples, settings)
    sha = _model_of(samples)
    logger.info("writing %s (%d samples) to the registry %s", baby_id, len(samples), registry.path)
    with registry.write() as tx:
        existed = tx.delete_infant(baby_id) if replace else False
        if not replace and tx.has_infant(baby_id):
            raise EnrollmentError(f"baby {baby_id!r} was enrolled meanwhile by another process; use update")
        tx.insert_infant(baby_id, display_name, room)
        for s in samples:
            tx.insert_sample(baby_id, s)
    logger.info("enrolled %s: %d samples, %.1f s of cry", baby_id, len(samples), total)
    return EnrollResult(
        baby_id, len(samples), total, sum(s.n_expirations for s in samples), sha, existed,
        _similar_babies(registry, baby_id, sha, settings.confusable_similarity),
    )


def ensure_can_update(registry: Registry, baby_id: str) -> Infant:
    infant = registry.require_infant(baby_id)
    if infant.status != "active":
        raise EnrollmentError(
            f"baby {baby_id!r} is discharged; re-enroll with `cryid enroll add {baby_id} --replace`"
        )
    return infant


def update(
    registry: Registry, baby_id: str, samples: Sequence[NewSample], settings: RegistrySettings
) -> EnrollResult:
    """Add samples to an enrolled, active baby (for example at discharge)."""
    ensure_can_update(registry, baby_id)
    total = check_min_cry(samples, settings)
    sha = _model_of(samples)
    logger.info("writing %d samples of %s to the registry %s", len(samples), baby_id, registry.path)
    with registry.write() as tx:
        if tx.infant_status(baby_id) != "active":
            raise EnrollmentError(f"baby {baby_id!r} was removed meanwhile by another process")
        for s in samples:
            tx.insert_sample(baby_id, s)
        tx.touch_infant(baby_id)
    return EnrollResult(
        baby_id, len(samples), total, sum(s.n_expirations for s in samples), sha, False,
        _similar_babies(registry, baby_id, sha, settings.confusable_similarity),
    )


def remove(registry: Registry, baby_id: str, purge: bool = False) -> str:
    """Discharge (the record stays, the daemon stops matching it) or, with ``purge``, delete everything."""
    infant = registry.require_infant(baby_id)
    if not purge and infant.status == "discharged":
        raise EnrollmentError(f"baby {baby_id!r} is already discharged; use --purge to delete the record")
    with registry.write() as tx:
        if purge:
            if not tx.delete_infant(baby_id):
                raise EnrollmentError(f"baby {baby_id!r} was deleted meanwhile by another process")
        else:
            tx.set_status(baby_id, "discharged")
    return "purged" if purge else "discharged"


@dataclass(frozen=True)
class ReembedResult:
    model_sha256: str
    n_samples: int
    babies: tuple[str, ...]
    failed_samples: tuple[int, ...]  # kept audio in which the current segmenter finds no cry
    needs_reenrollment: tuple[str, ...]


def reembed(registry: Registry, segmenter: SegmenterSettings, embedder: Embedder) -> ReembedResult:
    """Rebuild every embedding for the current model from kept audio, in one transaction."""
    new: dict[int, SampleEmbeddings] = {}
    failed: list[int] = []
    babies: set[str] = set()
    for s in registry.samples():
        if not s.has_audio:
            continue
        audio = registry.sample_audio(s.sample_id)
        if audio is None:  # deleted meanwhile
            continue
        try:
            new[s.sample_id] = embed_recording(decode_flac(audio), segmenter, embedder)
            babies.add(s.baby_id)
        except EnrollmentError:
            failed.append(s.sample_id)
    with registry.write() as tx:
        for sample_id, emb in new.items():
            tx.reembed_sample(sample_id, emb, cry_seconds(emb))  # False: the sample was deleted meanwhile
    return ReembedResult(
        embedder.sha256, len(new), tuple(sorted(babies)), tuple(failed),
        tuple(registry.needs_reenrollment(embedder.sha256)),
    )


# ------------------------------------------------------------------------------------- reports
@dataclass(frozen=True)
class InfantReport:
    infant: Infant
    samples: tuple[SampleInfo, ...]
    cry_s: float
    n_expirations: int
    model_sha256: str
    n_embedded: int  # expiration embeddings for the current model
    mean_cosine_to_centroid: float | None  # centroid quality: 1 = all samples alike
    min_cosine_to_centroid: float | None
    nearest: Confusable | None  # the most similar other ACTIVE baby
    needs_reenrollment: bool
    can_reembed: bool
    feedback: tuple[Feedback, ...]  # nurses' confirmations and rejections of episodes, undone ones too
    n_confirmed: int  # confirmed expiration embeddings (live) for the current model


def show(registry: Registry, baby_id: str, model_sha: str) -> InfantReport:
    infant = registry.require_infant(baby_id)
    samples = tuple(registry.samples(baby_id))
    cents = registry.centroids(model_sha)  # unusable embeddings (a poisoned registry) left out
    dim = next(iter(cents.values())).size if cents else None
    usable = [v for v in registry.sample_vectors(baby_id, model_sha) if usable_vector(v, dim)]
    vectors = np.stack(usable) if usable else np.zeros((0, 0), np.float32)
    mean_cos = min_cos = None
    nearest = None
    if vectors.shape[0]:
        c = centroid(vectors)
        sims = cosine_matrix(vectors, c[None, :])[:, 0]
        mean_cos, min_cos = float(sims.mean()), float(sims.min())
        others = {b: v for b, v in cents.items() if b != baby_id}
        if others:
            ids = sorted(others)
            s = cosine_matrix(c, np.stack([others[b] for b in ids]))[0]
            i = int(np.argmax(s))
            nearest = Confusable(ids[i], float(s[i]))
    fb = tuple(registry.feedback(baby_id=baby_id))
    return InfantReport(
        infant=infant,
        samples=samples,
        cry_s=float(sum(s.cry_s for s in samples)),
        n_expirations=sum(s.n_expirations for s in samples),
        model_sha256=model_sha,
        n_embedded=int(vectors.shape[0]),
        mean_cosine_to_centroid=mean_cos,
        min_cosine_to_centroid=min_cos,
        nearest=nearest,
        needs_reenrollment=infant.status == "active" and vectors.shape[0] == 0,
        can_reembed=bool(samples) and all(s.has_audio for s in samples),
        feedback=fb,
        n_confirmed=sum(
            f.n_expirations for f in fb if f.live and f.kind == "confirm" and f.model_sha256 == model_sha
        ),
    )


@dataclass(frozen=True)
class InfantSummary:
    baby_id: str
    display_name: str
    room: str
    status: str
    n_samples: int
    cry_s: float
    created_at: str
    needs_reenrollment: bool
    audio_kept: bool


def list_infants(registry: Registry, model_sha: str | None) -> list[InfantSummary]:
    by_baby: dict[str, list[SampleInfo]] = {}
    for s in registry.samples():
        by_baby.setdefault(s.baby_id, []).append(s)
    stale = set(registry.needs_reenrollment(model_sha)) if model_sha else set()
    return [
        InfantSummary(
            baby_id=i.baby_id,
            display_name=i.display_name,
            room=i.room,
            status=i.status,
            n_samples=len(by_baby.get(i.baby_id, [])),
            cry_s=float(sum(s.cry_s for s in by_baby.get(i.baby_id, []))),
            created_at=i.created_at,
            needs_reenrollment=i.baby_id in stale,
            audio_kept=bool(by_baby.get(i.baby_id)) and all(s.has_audio for s in by_baby[i.baby_id]),
        )
        for i in registry.infants()
    ]
