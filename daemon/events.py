"""MQTT payloads, defined once as pydantic models; ``cryid schema`` prints their JSON Schema.

Topics (prefix ``cryid/<room>`` unless ``mqtt.topic_prefix`` is set):

- ``<prefix>/status``: retained availability, ``online`` / ``offline`` (plain text; the last will is
  ``offline``).
- ``<prefix>/baby/<baby_id>``: :class:`CryEvent` for every expiration or episode identified as that baby.
- ``<prefix>/unknown``: :class:`CryEvent` for cries not confidently matched to one of the room's babies;
  it still lists the likeliest ``candidates`` ("probably 0003 or 0007").
- ``<prefix>/stats``: :class:`Stats`, periodically.

Two kinds of :class:`CryEvent`:

- ``expiration`` (provisional): one per detected cry expiration, right after it ends. Its decision uses
  every expiration of the current crying episode so far, so it firms up as the baby keeps crying;
  its times are those of the expiration.
- ``episode`` (final): one per crying episode (expirations less than ``identifier.episode_gap_s``
  apart), once the episode is over; its decision uses all of its expirations, its times span the episode.

Every event has a unique ``event_id``: delivery is at-least-once (QoS 1 and the outbox), so a
consumer de-duplicates by ``event_id``. Provisional and final events of one episode share ``episode_id``.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from cryid.models.strict import StrictModel

SCHEMA_VERSION = 2  # 2: confidence, candidates, n_candidates


class RunnerUp(StrictModel):
    """The second-best enrolled baby."""

    baby_id: str = Field(..., description="Id of the runner-up baby.")
    score: float = Field(..., description="Cosine similarity of the cry to the runner-up's centroid.")


class CandidateOut(StrictModel):
    """One of the room's enrolled babies with the calibrated probability that the cry is theirs."""

    baby_id: str = Field(..., description="Id of the candidate baby.")
    score: float = Field(..., description="Similarity of the cry to this baby's reference (cosine).")
    probability: float | None = Field(
        ...,
        ge=0.0,
        le=1.0,
        description="Calibrated probability that the cry is this baby's; null with an uncalibrated model.",
    )


class CryEvent(StrictModel):
    """One identification: a provisional ``expiration`` event or a final ``episode`` event."""

    schema_version: int = Field(SCHEMA_VERSION, description="Payload format version.")
    event_id: str = Field(..., description="Unique id (UUID4) of this event, for de-duplication.")
    episode_id: str = Field(..., description="Id (UUID4) of the crying episode this event belongs to.")
    kind: Literal["expiration", "episode"] = Field(
        ..., description="`expiration`: provisional, per expiration; `episode`: final, per crying episode."
    )
    decision: Literal["identified", "unknown"] = Field(
        ...,
        description="`identified` when `confidence >= identifier.min_confidence` (and any expert "
        "`min_score`/`min_margin` override is met); uncalibrated models: score and margin thresholds.",
    )
    baby_id: str | None = Field(..., description="The identified baby; null when unknown.")
    best_baby_id: str | None = Field(
        ..., description="Best-matching baby of the room, also when unknown; null if none enrolled."
    )
    score: float | None = Field(..., description="Cosine to the best centroid; null if none enrolled.")
    runner_up: RunnerUp | None = Field(..., description="Second-best baby; null if fewer than two enrolled.")
    margin: float | None = Field(
        ..., description="score - runner_up.score; equals score with one enrolled baby; null if none."
    )
    confidence: float | None = Field(
        ...,
        ge=0.0,
        le=1.0,
        description="Calibrated probability that best_baby_id is the baby crying (given how many babies "
        "the room has); null with an uncalibrated model or no enrolled baby.",
    )
    candidates: list[CandidateOut] = Field(
        ..., max_length=3, description="The room's 3 likeliest babies, best first (also when unknown)."
    )
    n_candidates: int = Field(..., ge=0, description="Enrolled babies of the room the cry was compared with.")
    started_at: datetime = Field(..., description="UTC start (ISO 8601) of the expiration / episode.")
    ended_at: datetime = Field(..., description="UTC end (ISO 8601) of the expiration / episode.")
    stream_offset_s: float = Field(..., description="Start, in seconds from the start of the audio source.")
    duration_s: float = Field(..., description="ended_at - started_at in seconds.")
    n_expirations: int = Field(..., ge=1, description="Expirations the decision is based on.")
    level_dbfs: float = Field(..., description="Loudest expiration level (RMS, dBFS) in the decision.")
    model_sha256: str = Field(..., description="sha256 of the model.onnx that made the embeddings.")
    room: str = Field(..., description="Ward room of the microphone.")

    def to_json(self) -> str:
        return self.model_dump_json()


class Stats(StrictModel):
    """Periodic health figures of the daemon."""

    schema_version: int = Field(SCHEMA_VERSION, description="Payload format version.")
    at: datetime = Field(..., description="UTC time of these figures.")
    room: str = Field(..., description="Ward room of the microphone.")
    uptime_s: float = Field(..., description="Seconds since the daemon started.")
    stream_offset_s: float = Field(..., description="Seconds of audio read from the source so far.")
    realtime_factor: float | None = Field(
        ..., description="Processing seconds per second of audio since the last stats (<1: keeps up)."
    )
    queue_depth: int = Field(..., description="Audio chunks waiting between source and pipeline.")
    dropped_frames: int = Field(..., description="Audio frames lost so far (source overruns + full queue).")
    outbox_size: int = Field(..., description="Events not yet acknowledged by the broker.")
    outbox_dropped: int = Field(..., description="Events dropped because the outbox was full (ever).")
    input_level_dbfs: float | None = Field(..., description="RMS input level since the last stats, dBFS.")
    source_ok: bool = Field(..., description="False while the audio source fails (e.g. microphone gone).")
    source_error: str | None = Field(..., description="Last source error, when source_ok is false.")
    expirations: int = Field(..., description="Expirations identified so far.")
    episodes: int = Field(..., description="Episodes closed so far.")
    enrolled: int = Field(..., description="Babies of the room with a reference for the current model.")
    needs_reenrollment: list[str] = Field(..., description="Babies without embeddings for the current model.")
    model_sha256: str = Field(..., description="sha256 of the model in use.")
    nonfinite_samples: int = Field(0, description="NaN / infinite input samples replaced by silence so far.")
    publish_refused: int = Field(
        0, description="Publishes the broker refused (PUBACK failure, e.g. ACL); the events stay stored."
    )
    broker_error: str | None = Field(None, description="Last broker problem (refusal, TLS, connection).")
    disk_full: bool = Field(False, description="True while the outbox cannot be written (disk full).")
    memory_events: int = Field(0, description="Events held in memory while the outbox cannot be written.")


def json_schemas() -> dict[str, Any]:
    """JSON Schemas of every payload, keyed by the topic they appear on."""
    from cryid.daemon.feedback import json_schemas as command_schemas

    return {
        "<prefix>/status": {"type": "string", "enum": ["online", "offline"], "description": "Retained."},
        "<prefix>/baby/<baby_id> and <prefix>/unknown": CryEvent.model_json_schema(),
        "<prefix>/stats": Stats.model_json_schema(),
        **command_schemas(),  # <prefix>/cmd/confirm|reject|undo (from nurses) and cmd/result
        "<prefix>/babies": Roster.model_json_schema(),
        "<prefix>/baby/<baby_id>/state": BabyState.model_json_schema(),
    }


def schema_text() -> str:
    """What ``cryid schema`` prints."""
    return json.dumps(json_schemas(), indent=2)


# Retained state for the ward dashboard (cryid.daemon.state) --------------------------------------
class RosterBaby(StrictModel):
    """One enrolled (active) baby of the room."""

    baby_id: str = Field(..., description="Id of the baby (its events are on <prefix>/baby/<baby_id>).")
    display_name: str | None = Field(..., description="Display name given at enrollment; null when none.")
    enrolled_at: datetime = Field(..., description="UTC time the baby was enrolled (ISO 8601).")


class Roster(StrictModel):
    """Retained: the room's enrolled babies, republished on every registry change."""

    schema_version: int = Field(SCHEMA_VERSION, description="Payload format version.")
    room: str = Field(..., description="Ward room of the microphone.")
    updated_at: datetime = Field(..., description="UTC time of this roster.")
    babies: list[RosterBaby] = Field(..., description="Active babies of the room, by id.")


class BabyState(StrictModel):
    """Retained: one baby now; an empty retained payload clears it (discharged or removed)."""

    schema_version: int = Field(SCHEMA_VERSION, description="Payload format version.")
    room: str = Field(..., description="Ward room of the microphone.")
    baby_id: str = Field(..., description="Id of the baby.")
    crying: bool = Field(..., description="True from the baby's first cry of an episode to its end.")
    crying_since: datetime | None = Field(
        ..., description="UTC start of the episode now heard; null if not crying."
    )
    last_cry_at: datetime | None = Field(..., description="UTC end of its last cry heard; null if none yet.")
    episode_id: str | None = Field(..., description="Episode now heard, or the last; null if none.")
    episodes_24h: int = Field(..., ge=0, description="Crying episodes attributed to it in the last 24 h.")
    cry_minutes_24h: float = Field(..., ge=0.0, description="Minutes of those episodes (start to end).")
    updated_at: datetime = Field(..., description="UTC time of this state.")
