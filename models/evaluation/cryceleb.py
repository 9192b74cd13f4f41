"""Reader for data sets in the CryCeleb2023 layout (the real CryCeleb2023 and donateacry-cc).

Layout: ``metadata.csv`` (``baby_id,period,duration,split,chronological_index,file_name,file_id``),
``<split>_pairs.csv`` (``baby_id_B,baby_id_D,id[,label]``), the audio under ``audio/``, and optionally
``provenance.csv`` (``file_id,...,recording``: the recording channel of each file). Every field is
read as a string (``baby_id`` ``0694`` keeps its leading zero). A malformed set raises
``CryCelebError`` with one line naming the problem and the fix.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryid.models.errors import CryidError

logger = logging.getLogger(__name__)

METADATA_COLUMNS = ("baby_id", "period", "duration", "split", "chronological_index", "file_name", "file_id")
PAIR_COLUMNS = ("baby_id_B", "baby_id_D", "id")
PERIODS = ("B", "D")


class CryCelebError(CryidError):
    """A data set that does not follow the CryCeleb layout; the message names the problem and the fix."""


@dataclass(frozen=True)
class Recording:
    """One row of metadata.csv: one audio file of one baby in one period."""

    file_id: str
    baby_id: str
    period: str
    split: str
    chronological_index: str
    duration_s: float
    path: Path


@dataclass(frozen=True)
class Pair:
    """One verification trial: the B recordings of ``baby_id_b`` against the D recordings of ``baby_id_d``."""

    pair_id: str
    baby_id_b: str
    baby_id_d: str
    label: int | None


def _chronological_key(rec: Recording) -> tuple[int, int | str]:
    idx = rec.chronological_index.strip()
    return (0, int(idx)) if idx.isdigit() else (1, idx)


def _read_csv(path: Path, required: Iterable[str], fix: str) -> list[dict[str, str]]:
    if not path.is_file():
        raise CryCelebError(f"{path}: no such file; {fix}")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in required if c not in columns]
        if missing:
            raise CryCelebError(
                f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(columns) or 'none'}); "
                f"the CryCeleb layout needs {', '.join(required)}"
            )
        rows = []
        for row in reader:
            rows.append({(k or "").strip(): (v or "").strip() for k, v in row.items()})
    return rows


@dataclass(frozen=True)
class CryCelebSet:
    """A data set in CryCeleb layout: its recordings and, when present, each file's recording channel."""

    root: Path
    recordings: tuple[Recording, ...]
    channels: dict[str, str] | None = None

    def split_recordings(self, split: str) -> list[Recording]:
        return [r for r in self.recordings if r.split == split]

    def groups(self, split: str) -> dict[tuple[str, str], list[Recording]]:
        """(baby_id, period) -> its recordings in chronological order, for one split."""
        out: dict[tuple[str, str], list[Recording]] = {}
        for rec in self.split_recordings(split):
            out.setdefault((rec.baby_id, rec.period), []).append(rec)
        return {key: sorted(recs, key=_chronological_key) for key, recs in sorted(out.items())}

    def channel_of(self, recordings: Iterable[Recording]) -> str | None:
        """The one recording channel of these files, or None (no provenance, or mixed channels)."""
        if self.channels is None:
            return None
        found = {self.channels.get(r.file_id) for r in recordings}
        return found.pop() if len(found) == 1 else None

    def check_audio(self, split: str) -> None:
        """Every audio file of ``split`` exists (one line naming the first missing file otherwise)."""
        recs = self.split_recordings(split)
        missing = [r for r in recs if not r.path.is_file()]
        if missing:
            hint = (
                "unzip audio.zip in the data directory"
                if (self.root / "audio.zip").is_file() and not (self.root / "audio").is_dir()
                else "restore the file or remove its row from metadata.csv"
            )
            raise CryCelebError(
                f"{missing[0].path}: audio file of {missing[0].file_id} is missing "
                f"({len(missing)} of {len(recs)} {split} files missing); {hint}"
            )

    def read_pairs(self, split: str) -> list[Pair]:
        """``<split>_pairs.csv`` checked against the metadata: both babies must have recordings."""
        path = self.root / f"{split}_pairs.csv"
        rows = _read_csv(path, PAIR_COLUMNS, f"a CryCeleb data set has {split}_pairs.csv beside metadata.csv")
        if not rows:
            raise CryCelebError(f"{path}: no pairs; the file needs at least one row")
        periods = {(r.baby_id, r.period) for r in self.split_recordings(split)}
        has_label = all(row.get("label", "") != "" for row in rows)
        if not has_label and any(row.get("label", "") != "" for row in rows):
            raise CryCelebError(f"{path}: some rows have a label and some do not; label every pair or none")
        pairs = []
        for line, row in enumerate(rows, start=2):
            b, d = row["baby_id_B"], row["baby_id_D"]
            for baby, period in ((b, "B"), (d, "D")):
                if (baby, period) not in periods:
                    raise CryCelebError(
                        f"{path}:{line}: pair {row['id']} names baby {baby!r} with no {period} recordings in "
                        f"the {split} split of metadata.csv; fix the pair or add the recordings"
                    )
            label: int | None = None
            if has_label:
                if row["label"] not in ("0", "1"):
                    raise CryCelebError(f"{path}:{line}: label {row['label']!r} is not 0 or 1")
                label = int(row["label"])
            pairs.append(Pair(pair_id=row["id"], baby_id_b=b, baby_id_d=d, label=label))
        ids = [p.pair_id for p in pairs]
        if len(set(ids)) != len(ids):
            raise CryCelebError(f"{path}: pair ids are not unique; each row needs its own id")
        return pairs


def load_cryceleb(root: str | Path) -> CryCelebSet:
    """Read ``metadata.csv`` (and ``provenance.csv`` when present) of a CryCeleb-layout directory."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise CryCelebError(f"{base}: no such directory; pass the folder that holds metadata.csv")
    rows = _read_csv(
        base / "metadata.csv",
        METADATA_COLUMNS,
        "pass the folder of a CryCeleb-layout data set (see docs/research.md)",
    )
    recordings = []
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        where = f"{base / 'metadata.csv'}:{line}"
        if row["period"] not in PERIODS:
            raise CryCelebError(f"{where}: period {row['period']!r} is not B or D")
        if not row["baby_id"] or not row["file_name"] or not row["file_id"]:
            raise CryCelebError(f"{where}: empty baby_id, file_name or file_id; fill in every column")
        if row["file_id"] in seen:
            raise CryCelebError(f"{where}: file_id {row['file_id']!r} appears twice; file ids must be unique")
        seen.add(row["file_id"])
        try:
            duration = float(row["duration"]) if row["duration"] else float("nan")
        except ValueError:
            raise CryCelebError(f"{where}: duration {row['duration']!r} is not a number of seconds") from None
        recordings.append(
            Recording(
                file_id=row["file_id"],
                baby_id=row["baby_id"],
                period=row["period"],
                split=row["split"],
                chronological_index=row["chronological_index"],
                duration_s=duration,
                path=base / row["file_name"],
            )
        )
    channels = None
    prov = base / "provenance.csv"
    if prov.is_file():
        prov_rows = _read_csv(prov, ("file_id", "recording"), "provenance.csv needs file_id and recording")
        channels = {r["file_id"]: r["recording"] for r in prov_rows}
    logger.info("%s: %d recordings, provenance %s", base, len(recordings), "yes" if channels else "no")
    return CryCelebSet(root=base, recordings=tuple(recordings), channels=channels)
