"""Move a ward's registry between PCs: ``cryid enroll export`` / ``import``.

The export is one JSON file holding the registry schema version and the sha256 of the model its
embeddings were made with; import refuses a file of another schema version or another model, so
embeddings of different models are never mixed. Kept audio (``--keep-audio``) travels with it.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from cryid.enrollment.enroll import EnrollmentError
from cryid.enrollment.registry import (
    BABY_ID_PATTERN,
    PERIODS,
    SCHEMA_VERSION,
    SOURCE_KINDS,
    STATUSES,
    Infant,
    NewSample,
    Registry,
    RegistryError,
    SampleEmbeddings,
    utc_now,
)
from cryid.models.audio import SAMPLE_RATE
from cryid.models.files import atomic_write

logger = logging.getLogger(__name__)

FORMAT = "cryid-registry-export"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def export_registry(registry: Registry, model_sha: str, out: Path) -> int:
    """Write every infant with its samples, this model's embeddings and any kept audio; returns the count."""
    infants = []
    for infant in registry.infants():
        samples = []
        for s in registry.samples(infant.baby_id):
            emb = registry.sample_embeddings(s.sample_id, model_sha)
            audio = registry.sample_audio(s.sample_id) if s.has_audio else None
            samples.append(
                {
                    "source_kind": s.source_kind,
                    "source": s.source,
                    "period": s.period,
                    "duration_s": s.duration_s,
                    "cry_s": s.cry_s,
                    "n_expirations": s.n_expirations,
                    "created_at": s.created_at,
                    "audio_flac": _b64(audio) if audio else None,
                    "embeddings": None
                    if emb is None
                    else {
                        "start_samples": list(emb.start_samples),
                        "end_samples": list(emb.end_samples),
                        "dim": int(emb.vectors.shape[1]),
                        "vectors_f32le": _b64(np.asarray(emb.vectors, dtype="<f4").tobytes()),
                    },
                }
            )
        infants.append(
            {
                "baby_id": infant.baby_id,
                "display_name": infant.display_name,
                "room": infant.room,
                "status": infant.status,
                "created_at": infant.created_at,
                "updated_at": infant.updated_at,
                "discharged_at": infant.discharged_at,
                "samples": samples,
            }
        )
    doc = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "model_sha256": model_sha,
        "exported_at": utc_now(),
        "infants": infants,
    }
    try:
        atomic_write(out, json.dumps(doc), private=True)  # 0600 whatever the umask: it identifies newborns
    except OSError as exc:
        raise EnrollmentError(f"cannot write export {out} ({exc}); choose a writable path") from exc
    return len(infants)


@dataclass(frozen=True)
class ImportedInfant(Infant):
    """An infant of an export file, with its samples."""

    samples: tuple[NewSample, ...]


# Bounds of an import: generous for any real ward, small enough that a bad file cannot poison the registry.
MAX_NAME_CHARS = 200
MAX_SOURCE_CHARS = 1000
MAX_TIMESTAMP_CHARS = 64
MAX_SAMPLES_PER_BABY = 1000
MAX_DURATION_S = 24 * 3600.0
MAX_EXPIRATIONS = 100_000
MAX_VECTOR_NORM = 1e4  # real embeddings have norms of tens; 1e38 or inf is poison
MIN_VECTOR_NORM = 1e-3
ROOM_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")  # the room of ``Settings`` (an MQTT topic level)


class _Bad(Exception):
    """One field of an export that cannot be imported; ``where`` names the field."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")


def _shown(value: Any, limit: int = 40) -> str:
    """A value for an error message: short, one line, control characters escaped."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _text(d: dict[str, Any], key: str, where: str, limit: int, *, empty: bool = True) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise _Bad(f"{where}.{key}", f"must be a string, got {type(v).__name__}")
    if len(v) > limit:
        raise _Bad(f"{where}.{key}", f"{len(v)} characters, at most {limit} allowed")
    if not v.isprintable():
        raise _Bad(f"{where}.{key}", f"holds control characters ({_shown(v)}); they are refused")
    if not empty and not v:
        raise _Bad(f"{where}.{key}", "is empty")
    return v


def _timestamp(d: dict[str, Any], key: str, where: str, *, optional: bool = False) -> str | None:
    if optional and d.get(key) is None:
        return None
    v = _text(d, key, where, MAX_TIMESTAMP_CHARS, empty=False)
    try:
        datetime.fromisoformat(v)
    except ValueError:
        raise _Bad(f"{where}.{key}", f"{_shown(v)} is not an ISO 8601 time") from None
    return v


def _number(d: dict[str, Any], key: str, where: str, low: float, high: float) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v <= high:
        raise _Bad(f"{where}.{key}", f"{_shown(v)} is not a number of {low:g} to {high:g}")
    return float(v)


def _integer(v: Any, where: str, low: int, high: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise _Bad(where, f"{_shown(v)} is not a whole number of {low} to {high}")
    return v


def _choice(d: dict[str, Any], key: str, where: str, allowed: tuple[str, ...]) -> str:
    v = d.get(key)
    if v not in allowed:
        raise _Bad(f"{where}.{key}", f"{_shown(v)} is not one of {', '.join(allowed)}")
    return str(v)


def _b64decode(v: Any, where: str) -> bytes:
    if not isinstance(v, str):
        raise _Bad(where, f"must be base64 text, got {type(v).__name__}")
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise _Bad(where, "is not valid base64") from None


def _audio(v: Any, where: str, duration_s: float) -> bytes:
    import soundfile as sf

    data = _b64decode(v, where)
    try:
        wav, rate = sf.read(io.BytesIO(data), dtype="float32")
    except (RuntimeError, sf.LibsndfileError, TypeError, ValueError) as exc:
        raise _Bad(where, f"does not decode as FLAC audio ({str(exc).splitlines()[0][:80]})") from None
    if rate != SAMPLE_RATE or wav.ndim != 1 or wav.size == 0:
        raise _Bad(where, f"audio must be mono {SAMPLE_RATE} Hz, got {rate} Hz with shape {wav.shape}")
    if abs(wav.size / SAMPLE_RATE - duration_s) > 1.0:
        raise _Bad(where, f"holds {wav.size / SAMPLE_RATE:.1f} s of audio but duration_s is {duration_s:.1f}")
    return data


def _embeddings(e: Any, where: str, model_sha: str, dim: int | None, duration_s: float) -> SampleEmbeddings:
    if not isinstance(e, dict):
        raise _Bad(where, f"must be an object, got {type(e).__name__}")
    if dim is None:
        dim = _integer(e.get("dim"), f"{where}.dim", 1, 4096)
    elif e.get("dim") != dim or isinstance(e.get("dim"), bool):
        raise _Bad(f"{where}.dim", f"{_shown(e.get('dim'))}, but the current model's embeddings have {dim}")
    starts, ends = e.get("start_samples"), e.get("end_samples")
    if not isinstance(starts, list) or not isinstance(ends, list) or len(starts) != len(ends) or not starts:
        raise _Bad(where, "start_samples and end_samples must be lists of one equal, non-zero length")
    if len(starts) > MAX_EXPIRATIONS:
        raise _Bad(where, f"{len(starts)} expirations, at most {MAX_EXPIRATIONS}")
    last = int(duration_s * SAMPLE_RATE) + SAMPLE_RATE
    for k, (s, t) in enumerate(zip(starts, ends, strict=True)):
        _integer(s, f"{where}.start_samples[{k}]", 0, last)
        if _integer(t, f"{where}.end_samples[{k}]", 0, last) <= s:
            raise _Bad(f"{where}.end_samples[{k}]", f"{t} is not after its start {s}")
    raw = _b64decode(e.get("vectors_f32le"), f"{where}.vectors_f32le")
    if len(raw) != 4 * dim * len(starts):
        raise _Bad(f"{where}.vectors_f32le", f"{len(raw)} bytes, expected {len(starts)} x {dim} float32")
    vectors = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(len(starts), dim)
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    for k, n in enumerate(norms):
        if not np.isfinite(vectors[k]).all() or not MIN_VECTOR_NORM <= n <= MAX_VECTOR_NORM:
            raise _Bad(
                f"{where}.vectors_f32le[{k}]",
                f"not a usable embedding (norm {n:.3g}, finite {bool(np.isfinite(vectors[k]).all())}); "
                f"embeddings have finite values and a norm of {MIN_VECTOR_NORM:g} to {MAX_VECTOR_NORM:g}",
            )
    return SampleEmbeddings(model_sha, vectors, tuple(starts), tuple(ends))


def _parse_sample(d: Any, where: str, model_sha: str, dim: int | None) -> NewSample:
    if not isinstance(d, dict):
        raise _Bad(where, f"must be an object, got {type(d).__name__}")
    duration_s = _number(d, "duration_s", where, 0.0, MAX_DURATION_S)
    cry_s = _number(d, "cry_s", where, 0.0, MAX_DURATION_S)
    if cry_s > duration_s + 1e-3:
        raise _Bad(f"{where}.cry_s", f"{cry_s:g} s of cry in {duration_s:g} s of audio")
    emb = d.get("embeddings")
    audio = d.get("audio_flac")
    return NewSample(
        source_kind=_choice(d, "source_kind", where, SOURCE_KINDS),
        source=_text(d, "source", where, MAX_SOURCE_CHARS),
        period=_choice(d, "period", where, PERIODS),
        duration_s=duration_s,
        cry_s=cry_s,
        n_expirations=_integer(d.get("n_expirations"), f"{where}.n_expirations", 0, MAX_EXPIRATIONS),
        embeddings=None
        if emb is None
        else _embeddings(emb, f"{where}.embeddings", model_sha, dim, duration_s),
        audio_flac=None if audio is None else _audio(audio, f"{where}.audio_flac", duration_s),
        created_at=str(_timestamp(d, "created_at", where)),
    )


def _parse_infant(d: Any, where: str, model_sha: str, dim: int | None) -> ImportedInfant:
    if not isinstance(d, dict):
        raise _Bad(where, f"must be an object, got {type(d).__name__}")
    baby_id = d.get("baby_id")
    if not isinstance(baby_id, str) or not BABY_ID_PATTERN.fullmatch(baby_id):
        raise _Bad(f"{where}.baby_id", f"{_shown(baby_id)} is not a baby id (1-64 letters, digits, '_', '-')")
    where = f"{where} (baby {baby_id})"
    room = _text(d, "room", where, 64)
    if not ROOM_PATTERN.fullmatch(room):
        raise _Bad(f"{where}.room", f"{_shown(room)} is not a room name (1-64 letters, digits, '_', '-')")
    samples = d.get("samples")
    if not isinstance(samples, list) or len(samples) > MAX_SAMPLES_PER_BABY:
        raise _Bad(f"{where}.samples", f"must be a list of at most {MAX_SAMPLES_PER_BABY} samples")
    return ImportedInfant(
        baby_id=baby_id,
        display_name=_text(d, "display_name", where, MAX_NAME_CHARS),
        room=room,
        status=_choice(d, "status", where, STATUSES),
        created_at=str(_timestamp(d, "created_at", where)),
        updated_at=str(_timestamp(d, "updated_at", where)),
        discharged_at=_timestamp(d, "discharged_at", where, optional=True),
        samples=tuple(
            _parse_sample(s, f"{where}.samples[{k}]", model_sha, dim) for k, s in enumerate(samples)
        ),
    )


def read_export(path: Path, model_sha: str, dim: int | None = None) -> list[ImportedInfant]:
    """Parse and check every field of an export file against this cryid's schema version and model.

    ``dim`` is the current model's embedding size; every vector must have it. Any bad field refuses the
    whole file with one line naming the field and the entry.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EnrollmentError(f"{path}: no such file; check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EnrollmentError(
            f"{path}: not a cryid registry export ({exc}); use `cryid enroll export`"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise EnrollmentError(f"{path}: not a cryid registry export; create one with `cryid enroll export`")
    version = doc.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int) or version != SCHEMA_VERSION:
        raise EnrollmentError(
            f"{path}: registry schema version {_shown(version)}, "
            f"this cryid reads {SCHEMA_VERSION}; "
            "export it again with the same cryid version as this PC"
        )
    if doc.get("model_sha256") != model_sha:
        raise EnrollmentError(
            f"{path}: exported with model {_shown(str(doc.get('model_sha256'))[:12])}, "
            f"this cryid uses {model_sha[:12]}; "
            "set CRYID_MODEL to the same model as the exporting PC, or re-enroll the babies"
        )
    infants = doc.get("infants")
    if not isinstance(infants, list):
        raise EnrollmentError(f"{path}: damaged registry export (infants: not a list); export it again")
    out: list[ImportedInfant] = []
    seen: set[str] = set()
    try:
        for k, d in enumerate(infants):
            infant = _parse_infant(d, f"infants[{k}]", model_sha, dim)
            if infant.baby_id in seen:
                raise _Bad(f"infants[{k}].baby_id", f"{infant.baby_id} appears twice")
            seen.add(infant.baby_id)
            out.append(infant)
    except (_Bad, RegistryError) as exc:
        raise EnrollmentError(f"{path}: refused, nothing imported: {exc}; export it again") from None
    return out


def import_registry(
    registry: Registry, path: Path, model_sha: str, replace: bool = False, dim: int | None = None
) -> int:
    """Add every infant of an export in one transaction; refuses ids already enrolled unless ``replace``.

    ``dim``: the current model's embedding size (every imported vector must have it).
    """
    infants = read_export(path, model_sha, dim)
    if not replace:
        clash = [i.baby_id for i in infants if registry.get_infant(i.baby_id) is not None]
        if clash:
            shown = ", ".join(clash[:5]) + (f" and {len(clash) - 5} more" if len(clash) > 5 else "")
            raise EnrollmentError(
                f"{len(clash)} of the babies in {path} are already enrolled ({shown}); "
                "use --replace to overwrite them"
            )
    with registry.write() as tx:
        for i in infants:
            if replace:
                tx.delete_infant(i.baby_id)
            elif tx.has_infant(i.baby_id):
                raise EnrollmentError(f"baby {i.baby_id!r} was enrolled meanwhile; use --replace")
            tx.insert_infant(i.baby_id, i.display_name, i.room, i.status)
            tx.set_times(i.baby_id, i.created_at, i.updated_at, i.discharged_at)
            for s in i.samples:
                tx.insert_sample(i.baby_id, s)
    logger.info("imported %d babies from %s", len(infants), path)
    return len(infants)
