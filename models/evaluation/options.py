"""``cryid eval``'s options, each default written once (the CLI restates none)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cryid.models.strict import StrictModel


class EvalOptions(StrictModel):
    """How ``cryid eval`` evaluates; each default is written here once."""

    split: Literal["dev", "test"] = Field(description="Split whose pairs (and B/D recordings) are evaluated.")
    protocol: Literal["pairs", "ward", "both"] = Field(
        "both", description="pairs: the paper's protocol; ward: enroll B files, identify D files; both."
    )
    tta: int = Field(
        1,
        ge=1,
        le=64,
        description="1: chronological concatenation; N>1: mean score of N seeded shuffled orders.",
    )
    seed: int = Field(0, ge=0, description="Seed of the shuffled concatenation orders of --tta.")
    score_norm: Literal["none", "asnorm"] = Field(
        "none", description="Score normalisation of the pair scores."
    )
    cohort: str = Field(
        "train", min_length=1, description="Split whose concatenations form the AS-norm cohort."
    )
    cohort_top_k: int = Field(
        200, ge=1, le=100_000, description="AS-norm: the k cohort scores closest to each side."
    )
    room_size: int | None = Field(
        None,
        ge=2,
        le=10_000,
        description="Ward protocol in seeded random rooms of N babies drawn from the split's B+D infants "
        "(None: one room with every baby enrolled).",
    )
    room_strangers: int | None = Field(
        None,
        ge=0,
        le=10_000,
        description="Babies of each room not enrolled (their cries must stay unknown); None: a quarter "
        "of the room (6 enrolled + 2 strangers in a room of 8).",
    )
    rooms: int = Field(200, ge=1, le=100_000, description="Number of seeded rooms with --room-size.")
    confirm: int = Field(
        0,
        ge=0,
        le=50,
        description="Confirm K D files of each enrolled baby (its confirmed reference); identify the rest.",
    )
    min_confidence: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Replaces identifier.min_confidence for this run (a query whose best baby has a "
        "confirmed cry is named when its calibrated confidence reaches it); None: identifier.min_confidence "
        "of the configuration, as the daemon.",
    )
    bootstrap: int = Field(
        1000, ge=0, le=100_000, description="Resamples of the infants for the 95% intervals (0: none)."
    )
    ward_channel: int | None = Field(
        None, ge=0, description="Pass every recording through the one simulated ward channel of this seed."
    )

    @model_validator(mode="after")
    def _room_fits(self) -> EvalOptions:
        if self.room_strangers is not None and self.room_size is None:
            raise ValueError("room_strangers needs room_size")
        if self.room_size is not None and self.strangers >= self.room_size:
            raise ValueError(f"a room of {self.room_size} cannot hold {self.strangers} strangers")
        return self

    @property
    def strangers(self) -> int:
        """Strangers per room (the default: a quarter of the room)."""
        if self.room_strangers is not None:
            return self.room_strangers
        return 0 if self.room_size is None else self.room_size // 4
