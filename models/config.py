"""Settings of the model-layer stages (segmenter, embedder). Each default is written here, once.

The daemon composes these into its one ``Settings`` (``cryid.daemon.config``); enrollment and
evaluation receive the same objects, so all three cut and embed audio the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from cryid.models.strict import StrictModel

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default"


class SegmenterSettings(StrictModel):
    """Energy gate (following the room's noise floor) + WebRTC VAD -> cry expirations.

    A frame is a cry frame when its level is ``gate_margin_db`` above the noise floor (and above
    ``min_level_dbfs``) and WebRTC VAD calls it voiced; the VAD never runs on frames the gate rejects.
    """

    highpass_hz: float = Field(
        20.0,
        ge=0.0,
        le=1000.0,
        description="Cut-off of the 2nd-order Butterworth high-pass through which the gate and the VAD "
        "hear the stream (removes a DC offset and sub-audible rumble; expirations keep the unfiltered "
        "audio); 0 turns it off.",
    )
    vad_aggressiveness: int = Field(
        3, ge=0, le=3, description="WebRTC VAD aggressiveness, 0 (least) to 3 (most aggressive)."
    )
    vad_reference_dbfs: float = Field(
        -40.0,
        ge=-120.0,
        le=0.0,
        description="The VAD hears gated frames lifted so that the gate threshold sits at this level "
        "(never attenuated): WebRTC VAD ignores voices quieter than about -45 dBFS.",
    )
    frame_ms: Literal[10, 20, 30] = Field(
        30, description="Analysis frame for the gate and the VAD (WebRTC VAD accepts 10, 20 or 30 ms)."
    )
    gate_margin_db: float = Field(
        12.0,
        ge=0.0,
        le=60.0,
        description="A frame passes the gate this far above the noise floor (a minimum: steady rumble "
        "spreads about 14 dB from its quietest 30 ms frame to its loudest).",
    )
    min_level_dbfs: float = Field(
        -60.0, ge=-120.0, le=0.0, description="Frames quieter than this never open the gate."
    )
    noise_floor_window_s: float = Field(
        5.0,
        gt=0.0,
        le=120.0,
        description="The noise floor follows a low percentile of the frame levels of the last this long.",
    )
    noise_floor_percentile: float = Field(
        0.0,
        ge=0.0,
        le=50.0,
        description="Percentile of recent frame levels the noise floor follows (0: minimum statistics; "
        "a baby breathes between expirations, so crying never fills the window).",
    )
    noise_floor_rise_db_per_s: float = Field(
        2.0,
        gt=0.0,
        le=1000.0,
        description="The floor falls at once but rises at most this fast (so sustained crying is not it).",
    )
    noise_floor_fast_rise_db_per_s: float = Field(
        20.0,
        gt=0.0,
        le=1000.0,
        description="Rise rate once the gate has let through noise_after_ms of audio without a cry frame.",
    )
    noise_after_ms: int = Field(
        1000,
        ge=30,
        le=60000,
        description="Gated audio without a cry frame this long is noise: the floor may then rise fast.",
    )
    steady_after_ms: int = Field(
        2000,
        ge=30,
        le=60000,
        description="A gate open this long without a break is noise too (a baby breathes between "
        "expirations, a fan does not): the floor may then rise fast.",
    )
    min_level_span_db: float = Field(
        1.5,
        ge=0.0,
        le=40.0,
        description="Expirations whose frame levels span less (10th to 90th percentile) are steady noise "
        "(a cry swells and fades; 1.7% of real expirations span under 2 dB, white noise 0.6 dB).",
    )
    min_voiced_fraction: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Expirations with a smaller share of voiced cry frames (pitched: f0 50-1000 Hz, YIN "
        "aperiodicity under 0.3) are dropped as bursts of noise (a door, a cart, clatter, unvoiced "
        "speech), which WebRTC VAD takes for voice; 0 turns the check off.",
    )
    pre_roll_ms: int = Field(60, ge=0, le=1000, description="Audio kept before the first cry frame.")
    post_roll_ms: int = Field(60, ge=0, le=1000, description="Audio kept after the last cry frame.")
    hangover_ms: int = Field(
        90,
        ge=0,
        le=2000,
        description="An expiration ends after this long without a cry frame (shorter pauses are bridged).",
    )
    min_expiration_ms: int = Field(300, ge=30, le=10000, description="Shorter expirations are dropped.")
    max_expiration_ms: int = Field(
        4000,
        ge=500,
        le=60000,
        description="Longer expirations are split (0.3% of CryCeleb's exceed 4 s).",
    )
    split_search_ms: int = Field(
        60,
        ge=30,
        le=60000,
        description="A split cuts at the quietest frame of this last stretch, so the first piece is "
        "published at once instead of waiting for a pause found later.",
    )


class EmbedderSettings(StrictModel):
    """ONNX embedder: how onnxruntime runs the model (the model directory itself is ``Settings.model``)."""

    intra_op_threads: int = Field(2, ge=1, le=64, description="onnxruntime intra-op threads.")
    inter_op_threads: int = Field(1, ge=1, le=64, description="onnxruntime inter-op threads.")
    warmup: bool = Field(True, description="Run one dummy clip at load so the first cry is not slow.")
