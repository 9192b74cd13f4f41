"""MQTT payloads, defined once as pydantic models; ``cryid schema`` prints their JSON Schema.

The meaning of each topic (:func:`topics`) and of each payload field (the ``Field`` descriptions) is
written here only: ``docs/reference/payloads.md`` is generated from them and from the paragraphs below
(``python -m cryid.daemon.docgen``).

Every topic is under a prefix, ``cryid/<room>`` unless ``mqtt.topic_prefix`` is set, and is sent with
QoS 1. Delivery is at-least-once (QoS 1 and the outbox on disk, across broker outages and restarts), so
a consumer de-duplicates events by ``event_id``. With ``homeassistant.enabled`` the daemon also
publishes Home Assistant discovery configs under ``homeassistant/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field

from cryid.daemon.stages import StepFigure
from cryid.models.strict import StrictModel

SCHEMA_VERSION = 2  # 2: confidence, candidates, n_candidates

# Why a decision named no baby: the identifier's branches (cryid.daemon.identifier.Identifier.match).
Reason = Literal[
    "no_candidates", "below_min_confidence", "not_confirmed", "below_min_score", "below_min_margin"
]
REASONS: tuple[str, ...] = get_args(Reason)


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
    confirmed: bool = Field(
        False,
        description="True when a nurse had confirmed at least one cry of this baby (a live confirmed-cry "
        "reference for this model) when the decision was made; while false, the baby is named only at "
        "`identifier.min_confidence_unconfirmed` (default: never).",
    )


class CryEvent(StrictModel):
    """One identification: a provisional ``expiration`` event or a final ``episode`` event.

    A crying episode is a run of expirations less than ``identifier.episode_gap_s`` apart. Each
    expiration gets a provisional ``expiration`` event right after it ends; its decision uses every
    expiration of the episode so far, so it firms up while the baby keeps crying, and its times are those
    of the expiration. One final ``episode`` event follows once the episode is over (no expiration for
    ``identifier.episode_gap_s``, or after ``identifier.max_episode_s``); its decision uses all of the
    episode's expirations and its times span the episode. Both kinds share ``episode_id``.
    """

    schema_version: int = Field(
        SCHEMA_VERSION,
        description="Payload format version. Version 2 added `confidence`, `candidates` and "
        "`n_candidates`; consumers of version 1 can ignore them. `levels_dbfs`, `reason` and "
        "`candidates[].confirmed` (events) and `sources` (stats) are optional additions to version 2.",
    )
    event_id: str = Field(
        ...,
        description="Unique id (UUID4) of this event; delivery is at-least-once, so de-duplicate by it.",
    )
    episode_id: str = Field(..., description="Id (UUID4) of the crying episode this event belongs to.")
    kind: Literal["expiration", "episode"] = Field(
        ...,
        description="`expiration`: provisional, one per cry expiration as soon as it ends (the decision "
        "uses the episode so far); `episode`: final, one per crying episode once the baby has been quiet "
        "for `identifier.episode_gap_s`.",
    )
    decision: Literal["identified", "unknown"] = Field(
        ...,
        description="`identified` when `confidence >= identifier.min_confidence` (and any expert "
        "`min_score`/`min_margin` override is met; uncalibrated models: score and margin thresholds); "
        "otherwise `unknown`: `baby_id` is null, `reason` says why, and the event goes to "
        "`<prefix>/unknown`.",
    )
    baby_id: str | None = Field(..., description="The identified baby; null when unknown.")
    best_baby_id: str | None = Field(
        ...,
        description="Best-matching baby of the room, also when unknown (who came closest); null if none "
        "enrolled.",
    )
    score: float | None = Field(
        ...,
        description="Cosine similarity of the cry to the best-matching baby's reference; null if none "
        "enrolled.",
    )
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
        ...,
        max_length=3,
        description="The room's (up to) 3 likeliest babies, best score first; present in unknown events "
        'too ("probably 0003 or 0007").',
    )
    n_candidates: int = Field(..., ge=0, description="Enrolled babies of the room the cry was compared with.")
    reason: Reason | None = Field(
        None,
        description="Why no baby was named; null when `identified`. `no_candidates`: no baby of the room "
        "is enrolled for this model. `not_confirmed`: the best candidate reached `identifier.min_confidence` "
        "(and any expert override) but none of its cries is confirmed yet, so "
        "`identifier.min_confidence_unconfirmed` applied (default: never); confirming this cry as that "
        "baby's lets the daemon name it. `below_min_confidence`: the confidence is below the threshold that "
        "applied. `below_min_score` / `below_min_margin`: the expert `min_score` / `min_margin` "
        "(uncalibrated model: the cosine thresholds) not met.",
    )
    started_at: datetime = Field(..., description="UTC start (ISO 8601) of the expiration / episode.")
    ended_at: datetime = Field(..., description="UTC end (ISO 8601) of the expiration / episode.")
    stream_offset_s: float = Field(..., description="Start, in seconds from the start of the audio source.")
    duration_s: float = Field(..., description="ended_at - started_at in seconds.")
    n_expirations: int = Field(..., ge=1, description="Expirations the decision is based on.")
    level_dbfs: float = Field(..., description="Loudest expiration level (RMS, dBFS) in the decision.")
    model_sha256: str = Field(..., description="sha256 of the model.onnx that made the embeddings.")
    room: str = Field(..., description="Ward room of the microphone.")
    levels_dbfs: dict[str, float] | None = Field(
        None,
        description="Several microphones in the room ([[sources]]): the level (RMS, dBFS) at which each "
        "microphone that heard the cry heard it, by source name (the loudest expiration, for an episode); "
        "null with one microphone.",
    )

    def to_json(self) -> str:
        return self.model_dump_json()


class SourceStats(StrictModel):
    """Health figures of one audio source of the room (``[[sources]]``)."""

    name: str = Field(..., description="Source name.")
    ok: bool = Field(..., description="False while the source fails (device gone, file unreadable) or ended.")
    error: str | None = Field(..., description="Why not ok; null when ok.")
    flat: bool = Field(..., description="True while it delivers a flat line (silence, constant, clipped).")
    level_dbfs: float | None = Field(..., description="RMS level of about the last second, dBFS.")
    noise_floor_dbfs: float = Field(..., description="The segmenter's noise floor for this source, dBFS.")
    stream_offset_s: float = Field(..., description="Seconds of audio read from this source so far.")
    dropped_frames: int = Field(..., description="Audio frames lost so far (source overruns + full queue).")
    reopens: int = Field(..., description="Times the source failed or went flat and was reopened.")


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
    stages: dict[str, StepFigure] = Field(
        default_factory=dict,
        description="Where the time of the last (up to 1000) expiration events went, per step from the "
        "moment their last sample was heard to the PUBACK (heard_to_read, read_to_detected, "
        "detected_to_embedded, embedded_to_identified, identified_to_stored, stored_to_handed, "
        "handed_to_acked; totals end_to_publish and end_to_puback), ms.",
    )
    sources: list[SourceStats] = Field(
        default_factory=list, description="Per source of the room, with [[sources]]; empty with one [source]."
    )


@dataclass(frozen=True)
class Topic:
    """One MQTT topic of a room: its path under the prefix, who sends it, and its payload."""

    path: str  # after "<prefix>/"
    meaning: str
    retained: bool
    sent_by: str
    payload: type[BaseModel] | None = None  # a JSON payload; None: plain text, one of ``values``
    values: tuple[str, ...] = ()
    full: str | None = None  # the whole topic, for one that is not under ``<prefix>/``

    @property
    def name(self) -> str:
        """The topic as the reference writes it: ``<prefix>/<path>``, or its ``full`` name."""
        return self.full or f"<prefix>/{self.path}"


def topics() -> tuple[Topic, ...]:
    """Every topic under ``<prefix>``, in the order a reader meets them (the reference lists them so)."""
    from cryid.daemon.feedback import CommandResult, ConfirmCommand, RejectCommand, UndoCommand

    # fmt: off
    return (
        Topic("status", "Availability of the daemon; `offline` is also its last will (several rooms in one "
              "daemon: `offline` at a clean stop, the last will is `<base>/status`).", True, "daemon",
              values=("online", "offline")),
        Topic("status", "Several rooms in one daemon (`[[sources]]`) only: availability of the daemon "
              "process and its connection's last will; `<base>` is `mqtt.topic_prefix`, else `cryid`. A room "
              "is live while its `<prefix>/status` and this topic are both `online`.", True, "daemon",
              values=("online", "offline"), full="<base>/status"),
        Topic("baby/<baby_id>", "A cry event for a cry identified as that baby (one topic per enrolled "
              "baby, so a dashboard can follow one infant).", False, "daemon", CryEvent),
        Topic("unknown", "A cry event for a cry that matches no enrolled baby of the room well enough; it "
              "still lists the likeliest `candidates`.", False, "daemon", CryEvent),
        Topic("stats", "Health figures, every `mqtt.stats_interval_s`.", False, "daemon", Stats),
        Topic("babies", "The room's roster, republished on every registry change.", True, "daemon", Roster),
        Topic("baby/<baby_id>/state", "That baby now: crying, crying since, last cry, episodes and minutes "
              "of crying in 24 h; an empty retained message deletes it (a baby discharged, purged or moved).",
              True, "daemon", BabyState),
        Topic("pending", "The room's latest unnamed final episodes no nurse has answered yet (at most 10, "
              "last 24 h), newest first, for a dashboard that connects later; republished when a nurse "
              "confirms or rejects one.", True, "daemon", PendingCries),
        Topic("status/source", "The audio source: `ok`, `flat` (digital silence, a constant or a clipped "
              "flat line for `source.flat_timeout_s`) or `down` (the device failed and is being reopened, "
              "or the source ended).", True, "daemon", values=("ok", "flat", "down")),
        Topic("status/crying", "`ON` from an episode's first provisional event to its final event, else "
              "`OFF`.", True, "daemon", values=("ON", "OFF")),
        Topic("cmd/confirm", "A nurse's command: the cries of an episode were this baby's.", False,
              "the broker user `nurse` only", ConfirmCommand),
        Topic("cmd/reject", "A nurse's command: the cries of an episode were not this baby's.", False,
              "the broker user `nurse` only", RejectCommand),
        Topic("cmd/undo", "A nurse's command: take a confirmation or rejection back.", False,
              "the broker user `nurse` only", UndoCommand),
        Topic("cmd/result", "The daemon's answer to each command, with its `request_id`.", False, "daemon",
              CommandResult),
    )
    # fmt: on


def json_schemas() -> dict[str, Any]:
    """JSON Schemas of every payload, keyed by the topic they appear on."""
    from cryid.daemon.feedback import json_schemas as command_schemas

    return {
        "<prefix>/status": {"type": "string", "enum": ["online", "offline"], "description": "Retained."},
        "<base>/status": {
            "type": "string",
            "enum": ["online", "offline"],
            "description": "Retained; several rooms in one daemon: the daemon's availability and last will.",
        },
        "<prefix>/baby/<baby_id> and <prefix>/unknown": CryEvent.model_json_schema(),
        "<prefix>/stats": Stats.model_json_schema(),
        **command_schemas(),  # <prefix>/cmd/confirm|reject|undo (from nurses) and cmd/result
        "<prefix>/babies": Roster.model_json_schema(),
        "<prefix>/baby/<baby_id>/state": BabyState.model_json_schema(),
        "<prefix>/pending": PendingCries.model_json_schema(),
    }  # fmt: skip


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


class PendingCries(StrictModel):
    """Retained: the room's latest final episodes that named no baby and that no nurse has answered yet, so a
    dashboard opened or reloaded later still lists the cries waiting for a nurse's Confirm (the events
    themselves are not retained). Republished whenever the list changes: a new unnamed episode, a nurse's
    confirmation or rejection of a listed one (over MQTT or with `cryid enroll`, within a second), an undo
    that makes one wait again, an episode ageing out of 24 h."""

    schema_version: int = Field(SCHEMA_VERSION, description="Payload format version.")
    room: str = Field(..., description="Ward room of the microphone.")
    updated_at: datetime = Field(..., description="UTC time of this list.")
    episodes: list[CryEvent] = Field(
        ...,
        description="Final `unknown` episode events as published on `<prefix>/unknown`, newest first: at "
        "most the last 10 without a live confirmation or rejection, from the last 24 h (a restarted daemon "
        "rebuilds the list from the episodes its registry keeps).",
    )


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
