"""Settings of the model-layer stages (segmenter, embedder). Each default is written here, once.

The daemon composes these into its one ``Settings`` (``cryid.daemon.config``); enrollment and
evaluation receive the same objects, so all three cut and embed audio the same way.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default"


class SegmenterSettings(BaseModel):
    """Energy gate (following the room's noise floor) + WebRTC VAD -> cry expirations."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vad_aggressiveness: int = Field(
        2, ge=0, le=3, description="WebRTC VAD aggressiveness, 0 (least) to 3 (most aggressive)."
    )
    frame_ms: int = Field(
        30, description="Analysis frame for the gate and the VAD (WebRTC VAD accepts 10, 20 or 30 ms)."
    )
    gate_margin_db: float = Field(
        12.0, ge=0.0, le=60.0, description="A frame opens the gate when it is this much above the noise floor."
    )
    min_level_dbfs: float = Field(
        -50.0, ge=-120.0, le=0.0, description="Frames quieter than this never open the gate."
    )
    noise_floor_window_s: float = Field(
        3.0, gt=0.0, le=60.0, description="Time constant with which the noise floor follows the room."
    )
    pre_roll_ms: int = Field(90, ge=0, le=1000, description="Audio kept before the gate opens.")
    hangover_ms: int = Field(150, ge=0, le=2000, description="Gate stays open this long after the last cry frame.")
    min_expiration_ms: int = Field(300, ge=30, le=10000, description="Shorter expirations are dropped.")
    max_expiration_ms: int = Field(
        4000, ge=500, le=60000, description="Longer expirations are split (0.3% of CryCeleb's exceed 4 s)."
    )


class EmbedderSettings(BaseModel):
    """ONNX embedder: how onnxruntime runs the model (the model directory itself is ``Settings.model``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    intra_op_threads: int = Field(2, ge=1, le=64, description="onnxruntime intra-op threads.")
    inter_op_threads: int = Field(1, ge=1, le=64, description="onnxruntime inter-op threads.")
    warmup: bool = Field(True, description="Run one dummy clip at load so the first cry is not slow.")
