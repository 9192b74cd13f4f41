"""Move a ward's registry between PCs: ``cryid enroll export`` / ``import``.

The export is one JSON file holding the registry schema version and the sha256 of the model its
embeddings were made with; import refuses a file of another schema version or another model, so
embeddings of different models are never mixed. Kept audio (``--keep-audio``) travels with it.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryid.enrollment.enroll import EnrollmentError
from cryid.enrollment.registry import (
    PERIODS,
    SCHEMA_VERSION,
    SOURCE_KINDS,
    STATUSES,
    Infant,
    NewSample,
    Registry,
    SampleEmbeddings,
    check_baby_id,
    utc_now,
)

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
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(doc, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise EnrollmentError(f"cannot write export {out} ({exc}); choose a writable path") from exc
    return len(infants)


@dataclass(frozen=True)
class ImportedInfant(Infant):
    """An infant of an export file, with its samples."""

    samples: tuple[NewSample, ...]


def _parse_sample(d: dict[str, Any], model_sha: str) -> NewSample:
    if d["period"] not in PERIODS or d["source_kind"] not in SOURCE_KINDS:
        raise ValueError("bad period or source kind")
    emb = None
    if d.get("embeddings") is not None:
        e = d["embeddings"]
        vectors = np.frombuffer(base64.b64decode(e["vectors_f32le"]), dtype="<f4").astype(np.float32)
        emb = SampleEmbeddings(
            model_sha,
            vectors.reshape(-1, int(e["dim"])),
            tuple(int(x) for x in e["start_samples"]),
            tuple(int(x) for x in e["end_samples"]),
        )
    audio = d.get("audio_flac")
    return NewSample(
        source_kind=str(d["source_kind"]),
        source=str(d["source"]),
        period=str(d["period"]),
        duration_s=float(d["duration_s"]),
        cry_s=float(d["cry_s"]),
        n_expirations=int(d["n_expirations"]),
        embeddings=emb,
        audio_flac=base64.b64decode(audio) if audio else None,
        created_at=str(d["created_at"]),
    )


def read_export(path: Path, model_sha: str) -> list[ImportedInfant]:
    """Parse and check an export file against this cryid's schema version and model."""
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
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise EnrollmentError(
            f"{path}: registry schema version {doc.get('schema_version')}, "
            f"this cryid reads {SCHEMA_VERSION}; "
            "export it again with the same cryid version as this PC"
        )
    if doc.get("model_sha256") != model_sha:
        raise EnrollmentError(
            f"{path}: exported with model {str(doc.get('model_sha256'))[:12]}, "
            f"this cryid uses {model_sha[:12]}; "
            "set CRYID_MODEL to the same model as the exporting PC, or re-enroll the babies"
        )
    try:
        out = []
        for d in doc["infants"]:
            if d["status"] not in STATUSES:
                raise ValueError(f"bad status {d['status']!r}")
            out.append(
                ImportedInfant(
                    baby_id=check_baby_id(str(d["baby_id"])),
                    display_name=str(d["display_name"]),
                    room=str(d["room"]),
                    status=str(d["status"]),
                    created_at=str(d["created_at"]),
                    updated_at=str(d["updated_at"]),
                    discharged_at=d.get("discharged_at"),
                    samples=tuple(_parse_sample(s, model_sha) for s in d["samples"]),
                )
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise EnrollmentError(f"{path}: damaged registry export ({exc}); export it again") from None
    return out


def import_registry(registry: Registry, path: Path, model_sha: str, replace: bool = False) -> int:
    """Add every infant of an export in one transaction; refuses ids already enrolled unless ``replace``."""
    infants = read_export(path, model_sha)
    if not replace:
        clash = [i.baby_id for i in infants if registry.get_infant(i.baby_id) is not None]
        if clash:
            raise EnrollmentError(
                f"{len(clash)} babies of {path} are already enrolled ({', '.join(clash[:5])}); "
                "use --replace to overwrite them"
            )
    with registry.transaction() as conn:
        for i in infants:
            if replace:
                Registry.delete_infant(conn, i.baby_id)
            elif conn.execute("SELECT 1 FROM infants WHERE baby_id = ?", (i.baby_id,)).fetchone():
                raise EnrollmentError(f"baby {i.baby_id!r} was enrolled meanwhile; use --replace")
            Registry.insert_infant(conn, i.baby_id, i.display_name, i.room, i.status)
            conn.execute(
                "UPDATE infants SET created_at = ?, updated_at = ?, discharged_at = ? WHERE baby_id = ?",
                (i.created_at, i.updated_at, i.discharged_at, i.baby_id),
            )
            for s in i.samples:
                Registry.insert_sample(conn, i.baby_id, s)
    logger.info("imported %d babies from %s", len(infants), path)
    return len(infants)
