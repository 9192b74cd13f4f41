"""Several microphones and rooms in one daemon: the ``[[sources]]`` list of the configuration.

Each entry names one audio input and the ward room it is in::

    [[sources]]
    name = "room1-cot"          # logs, stats, the event's levels_dbfs
    room = "room1"              # topics cryid/room1/..., the babies enrolled in room1, its episodes
    device = "USB Audio"        # microphone (index or part of its name, see `cryid devices`)
    gain_db = 6.0               # optional
    segmenter = { gate_margin_db = 10.0 }   # optional overrides of [segmenter] for this microphone

Instead of ``device``, ``file`` (an audio file played at real speed) or ``stdin = true`` (raw s16le 16 kHz
mono) feed a source from a recording, for tests and replays. Without ``sources`` the single ``[source]``
section and ``room`` work as before; :func:`resolve_sources` turns either form into one list and refuses
what cannot work (one microphone named twice, a room without a source, an empty list) with one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from cryid.models.config import SegmenterSettings
from cryid.models.errors import SettingsError
from cryid.models.strict import StrictModel

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class SourcesError(SettingsError):
    """The ``sources`` list cannot work as configured; the message names the problem and the fix."""


class SourceEntry(StrictModel):
    """One audio input of the daemon and the room it is in."""

    name: str = Field(..., pattern=NAME_PATTERN, description="Name of the source (logs, stats, levels_dbfs).")
    room: str = Field(
        ..., pattern=NAME_PATTERN,
        description="Ward room the microphone is in: its topics, its enrolled babies, its episodes.",
    )  # fmt: skip
    device: str | None = Field(
        None,
        description="Microphone: device index or (part of) its name, see `cryid devices`; unset: default.",
    )
    file: Path | None = Field(
        None, description="Instead of a microphone: an audio file, played at real speed (tests, replays)."
    )
    stdin: bool = Field(
        False, description="Instead of a microphone: raw s16le 16 kHz mono on standard input."
    )
    gain_db: float = Field(0.0, ge=-40.0, le=40.0, description="Gain applied to this source's audio first.")
    segmenter: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the [segmenter] settings for this source only."
    )


@dataclass(frozen=True)
class ResolvedSource:
    """A source as the daemon opens it: ``spec`` is ``mic``, ``-`` or a file path (``make_source``)."""

    name: str
    room: str
    spec: str
    device: str | None
    gain_db: float
    segmenter: SegmenterSettings


def _kind(e: SourceEntry) -> str:
    given = [
        k
        for k, v in (("device", e.device is not None), ("file", e.file is not None), ("stdin", e.stdin))
        if v
    ]
    if len(given) > 1:
        raise SourcesError(
            f"sources: {e.name} sets {' and '.join(given)}; "
            "a source is one microphone (device), one file or stdin"
        )
    return given[0] if given else "device"


def _device_key(device: str | None) -> str:
    return "(the default input device)" if device is None or not device.strip() else device.strip().lower()


def resolve_sources(settings: Any) -> list[ResolvedSource]:
    """The daemon's sources: the ``sources`` list, or the single ``[source]`` of ``room`` as a one-element
    list (spec ``mic``). Raises :class:`SourcesError` for a list that cannot work."""
    entries: list[SourceEntry] | None = settings.sources
    if entries is None:
        return [
            ResolvedSource("source", settings.room, "mic", settings.source.device, 0.0, settings.segmenter)
        ]
    if not entries:
        raise SourcesError(
            "sources is an empty list, so no room has a source; add a [[sources]] table (name, room, device) "
            "or remove `sources` to use the single [source]"
        )
    if settings.source.device is not None:
        raise SourcesError(
            f"source.device = {settings.source.device!r} and a sources list are both set; give the device "
            "of each microphone in its [[sources]] entry and remove source.device"
        )
    out: list[ResolvedSource] = []
    names: dict[str, str] = {}
    devices: dict[str, str] = {}
    for e in entries:
        if e.name in names:
            raise SourcesError(f"sources: the name {e.name!r} is used twice; give every source its own name")
        names[e.name] = e.room
        kind = _kind(e)
        if kind == "device":
            key = _device_key(e.device)
            if key in devices:
                raise SourcesError(
                    f"sources {devices[key]} and {e.name} both use device {key}; one microphone feeds one "
                    "source (`cryid devices` lists the inputs)"
                )
            devices[key] = e.name
        if kind == "stdin" and "-" in {s.spec for s in out}:
            raise SourcesError(f"sources: {e.name} reads stdin too; only one source can read standard input")
        try:
            seg = SegmenterSettings(**{**settings.segmenter.model_dump(), **e.segmenter})
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise SourcesError(
                f"sources: {e.name}: segmenter.{loc}: {err['msg']} (got {err.get('input')!r})"
            ) from exc
        spec = "mic" if kind == "device" else "-" if kind == "stdin" else str(e.file)
        out.append(ResolvedSource(e.name, e.room, spec, e.device, e.gain_db, seg))
    if "room" in settings.model_fields_set and settings.room not in names.values():
        raise SourcesError(
            f"room {settings.room!r} has no source "
            f"(the sources are in {', '.join(sorted(set(names.values())))}); "
            "add a [[sources]] entry with that room, or remove the top-level room"
        )
    return out


def rooms_of(sources: list[ResolvedSource]) -> dict[str, list[ResolvedSource]]:
    """The sources of each room, rooms in the order they first appear."""
    rooms: dict[str, list[ResolvedSource]] = {}
    for s in sources:
        rooms.setdefault(s.room, []).append(s)
    return rooms


def devices_snippet(devices: list[Any]) -> str:
    """``cryid devices``: a ready-to-paste ``[[sources]]`` table per input device (rooms to be filled in)."""
    blocks = []
    for i, d in enumerate(devices, 1):
        blocks.append(
            f'[[sources]]\nname = "mic{i}"\nroom = "room{i}"  # the ward room this microphone is in\n'
            f"device = {json.dumps(d.name)}  # index {d.index}, {d.hostapi}, {d.max_input_channels} ch"
        )
    return "\n\n".join(blocks) + "\n"
