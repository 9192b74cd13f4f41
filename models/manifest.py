"""The model artifact's manifest: what ``model.onnx`` is, where it came from, and how well it matches.

A model directory holds ``model.onnx`` and ``manifest.json``. The manifest records the format
version, the source, the front-end parameters (so run time computes the features the model was
trained on), the embedding size, the sha256 of the ONNX file, the export parity figures, metrics,
the learned back-end (if any), the training command and the quantisation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cryid.models.calibration import Calibration
from cryid.models.errors import CryidError, validation_message
from cryid.models.strict import StrictModel

MANIFEST_NAME = "manifest.json"
ONNX_NAME = "model.onnx"
FORMAT_VERSION = 1


class ModelError(CryidError):
    """A model directory or source that cryid cannot use; the message names the problem and the fix."""


class FrontendParams(StrictModel):
    """Log-mel features as speechbrain's ``Fbank`` + ``InputNormalization(std_norm=False)``.

    ``sentence_mean`` (the CryCeleb recipe) removes each clip's own per-band mean; ``global_mean``
    (speechbrain's ``norm_type="global"``) removes one fixed per-band mean measured on the training
    data, so a clip's long-term spectrum stays visible to the model.
    """

    sample_rate: int = Field(16000, ge=8000, le=48000, description="Sample rate of the audio, Hz.")
    n_fft: int = Field(400, ge=16, le=8192, description="FFT size, samples.")
    win_length: int = Field(400, ge=16, le=8192, description="Analysis window (Hamming, periodic), samples.")
    hop_length: int = Field(160, ge=1, le=8192, description="Hop between frames, samples.")
    n_mels: int = Field(80, ge=1, le=512, description="Number of triangular mel filters.")
    f_min_hz: float = Field(0.0, ge=0.0, description="Lowest mel filter edge, Hz.")
    f_max_hz: float = Field(8000.0, gt=0.0, description="Highest mel filter edge, Hz.")
    amin: float = Field(1e-10, gt=0.0, description="Floor of the mel power before 10*log10.")
    top_db: float = Field(
        80.0, gt=0.0, description="Features are clipped this many dB below the clip's maximum."
    )
    normalization: Literal["sentence_mean", "global_mean"] = Field(
        "sentence_mean",
        description="sentence_mean: subtract each clip's per-band mean over time; global_mean: subtract "
        "`global_mean` (no variance scaling either way).",
    )
    global_mean: tuple[float, ...] | None = Field(
        None, description="Per-band mean (n_mels values, dB) subtracted with `global_mean` normalization."
    )

    @model_validator(mode="after")
    def _global_mean_fits(self) -> FrontendParams:
        if self.normalization == "global_mean":
            if self.global_mean is None or len(self.global_mean) != self.n_mels:
                got = "none" if self.global_mean is None else f"{len(self.global_mean)} values"
                raise ValueError(
                    f"global_mean normalization needs global_mean with {self.n_mels} values, got {got}"
                )
        elif self.global_mean is not None:
            raise ValueError("global_mean is given but normalization is not global_mean")
        return self


class ParityReport(BaseModel):
    """How closely the exported model (NumPy front end + ONNX) reproduces speechbrain's ``encode_batch``."""

    model_config = ConfigDict(extra="forbid")

    reference: str = Field(description="What the ONNX path was compared with.")
    clips_s: list[float] = Field(description="Durations of the check clips, seconds.")
    min_cosine: float = Field(description="Lowest cosine between ONNX and reference embeddings.")
    max_abs_diff: float = Field(description="Largest absolute difference of any embedding element.")
    threshold: float = Field(description="Export refuses a model whose min_cosine is below this.")


class QuantizationReport(BaseModel):
    """An int8 model: the scheme and its agreement with the fp32 export it came from."""

    model_config = ConfigDict(extra="forbid")

    scheme: str = Field(description="Quantisation scheme (onnxruntime.quantization).")
    min_cosine_to_fp32: float = Field(description="Lowest cosine between int8 and fp32 embeddings.")
    mean_cosine_to_fp32: float = Field(description="Mean cosine between int8 and fp32 embeddings.")
    fp32_sha256: str = Field(description="sha256 of the fp32 ONNX model that was quantised.")
    threshold: float = Field(description="Export refuses an int8 model whose min cosine is below this.")


class BackendInfo(BaseModel):
    """A learned back-end ``(embedding - mean) @ transform`` appended inside the ONNX graph."""

    model_config = ConfigDict(extra="forbid")

    file: str = Field(description="Path of the backend.npz that was appended.")
    sha256: str = Field(description="sha256 of backend.npz.")
    input_dim: int = Field(ge=1, description="ECAPA embedding size.")
    output_dim: int = Field(ge=1, description="Embedding size after the back-end.")
    kind: str | None = Field(None, description="What the back-end is (e.g. LDA), if backend.npz says.")


class BranchInfo(BaseModel):
    """A GMM-supervector branch computed from the same features inside the ONNX graph and fused with the
    back-end's output: the embedding is ``[a / |a|, b] / sqrt(2)`` (a: back-end output, b: the branch's
    unit-length output, ``[b_1 / |b_1|, ..., b_K / |b_K|] / sqrt(K)`` over its K UBMs)."""

    model_config = ConfigDict(extra="forbid")

    file: str = Field(description="Path of the gmm_branch.npz that was appended.")
    sha256: str = Field(description="sha256 of gmm_branch.npz.")
    components: int = Field(ge=1, description="Components of the universal background model.")
    cepstra: int = Field(ge=1, description="Cepstral coefficients per frame (and as many deltas).")
    output_dim: int = Field(ge=1, description="Branch embedding size (its LDAs' outputs side by side).")
    members: int = Field(
        1, ge=1, description="UBMs in the branch, each with its own LDA; their cosines are averaged."
    )


class TrainingInfo(BaseModel):
    """From SRC's ``train_info.json``: how the source model was trained."""

    model_config = ConfigDict(extra="forbid")

    command: str | None = Field(None, description="The command line that trained the model.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Training/validation metrics.")


class Manifest(BaseModel):
    """``manifest.json`` of a model directory."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = Field(FORMAT_VERSION, description="Manifest format version.")
    created_at: str = Field(description="UTC ISO 8601 time of export.")
    source: str = Field(description="SRC as given to `cryid model export` (directory or hub id).")
    export_command: str | None = Field(None, description="The command line that exported this model.")
    frontend: FrontendParams = Field(default_factory=FrontendParams, description="Front-end parameters.")
    input_name: str = Field("features", description="ONNX input: (batch, frames, n_mels) float32.")
    output_name: str = Field("embedding", description="ONNX output: (batch, embedding_dim) float32.")
    embedding_dim: int = Field(ge=1, description="Size of the embedding the model returns.")
    onnx_sha256: str = Field(min_length=64, max_length=64, description="sha256 of model.onnx.")
    opset: int = Field(description="ONNX opset of the exported graph.")
    parity: ParityReport = Field(description="Export parity figures against speechbrain.")
    quantization: QuantizationReport | None = Field(None, description="int8 details; null for fp32.")
    backend: BackendInfo | None = Field(None, description="Learned back-end inside the graph; null if none.")
    branch: BranchInfo | None = Field(
        None, description="GMM-supervector branch fused with the back-end inside the graph; null if none."
    )
    training: TrainingInfo | None = Field(None, description="From SRC's train_info.json, if present.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Evaluation metrics (e.g. dev EER).")
    versions: dict[str, str] = Field(default_factory=dict, description="Library versions used to export.")
    calibration: Calibration | None = Field(
        None,
        description="Map from scores to the probability that the best candidate is right "
        "(`cryid model calibrate`); null until calibrated.",
    )


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_manifest(model_dir: Path) -> Manifest:
    """Read and validate ``model_dir/manifest.json``; ``ModelError`` with the fix on any problem."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(
            f"{model_dir}: no such model directory; "
            f"export one with `cryid model export SRC --out {model_dir}`"
        )
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        raise ModelError(
            f"{path}: missing; {model_dir} is not a cryid model directory "
            f"(re-export it with `cryid model export SRC --out {model_dir}`)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc}); re-export the model") from exc
    if isinstance(data, dict) and data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise ModelError(
            f"{path}: manifest format version {data.get('format_version')} is not supported "
            f"(this cryid reads {FORMAT_VERSION}); re-export the model with this cryid"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problem = validation_message(exc, where="manifest")
        raise ModelError(f"{path}: invalid manifest ({problem}); re-export the model") from exc


def write_manifest(manifest: Manifest, model_dir: Path) -> Path:
    path = Path(model_dir) / MANIFEST_NAME
    path.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path
