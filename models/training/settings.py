"""Settings of the offline tools ``cryid model train`` and ``cryid model calibrate``.

They live apart from the tools so that the ``cryid`` command can build its options from them (defaults
and descriptions are written once, here) without importing the tools: ``cryid run`` loads this module
and nothing else of ``models/training`` or ``models/evaluation``. pydantic only.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cryid.models.strict import StrictModel


class TrainSettings(StrictModel):
    """Every knob of ``cryid model train``; defaults are the CryCeleb paper's recipe."""

    channels: int = Field(
        1024, ge=8, le=4096, description="ECAPA-TDNN channels C (blocks C,C,C,C,3C); multiple of 8."
    )
    embedding_dim: int = Field(192, ge=8, le=4096, description="Embedding size (lin_neurons).")
    epochs: int = Field(10, ge=0, le=10000, description="Passes over the training baby-periods.")
    chunks_per_item: int = Field(
        1, ge=1, le=1000, description="Random chunks drawn per baby-period per epoch."
    )
    batch_size: int = Field(32, ge=1, le=1024, description="Chunks per optimiser step.")
    lr: float = Field(1e-4, gt=0.0, le=1.0, description="Adam learning rate.")
    margin: float = Field(0.2, ge=0.0, le=1.0, description="Additive angular margin of the AAM-softmax.")
    scale: float = Field(30.0, gt=0.0, le=100.0, description="Scale of the AAM-softmax.")
    chunk_min_s: float = Field(3.0, gt=0.0, le=60.0, description="Shortest random training chunk.")
    chunk_max_s: float = Field(5.0, gt=0.0, le=60.0, description="Longest random training chunk.")
    bandlimit_p: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Probability of resampling a chunk through 8 kHz (an AMR phone's band).",
    )
    noise_p: float = Field(
        0.0, ge=0.0, le=1.0, description="Probability of adding coloured noise to a chunk."
    )
    noise_snr_db: tuple[float, float] = Field((5.0, 30.0), description="SNR range of the added noise.")
    gain_p: float = Field(0.0, ge=0.0, le=1.0, description="Probability of a random loudness change.")
    gain_db: tuple[float, float] = Field((-20.0, 6.0), description="Range of the loudness change.")
    speed_p: float = Field(0.0, ge=0.0, le=1.0, description="Probability of a random speed change.")
    speeds: tuple[float, ...] = Field((0.95, 1.05), description="Speed factors to pick from.")
    max_freq_hz: float | None = Field(
        None,
        gt=0.0,
        le=8000.0,
        description="Ignore mel bands above this frequency (their first-layer weights are zero), so a 16 kHz "
        "and an 8 kHz phone look alike to the network; None uses all 80 bands.",
    )
    input_norm: Literal["sentence", "global"] = Field(
        "sentence",
        description="Input normalisation (speechbrain InputNormalization, std_norm=False): sentence removes "
        "each chunk's per-band mean (the paper); global removes the training data's per-band mean, "
        "fixed before training, so the network sees each recording's long-term spectrum.",
    )
    stats_init_db: tuple[float, ...] = Field(
        (),
        description="Start from an ECAPA-TDNN whose weights compute per-band mean and std of relu(x - t) of "
        "the normalised log-mel x for these thresholds t (dB) "
        "(cryid.models.training.train_parts.stats_init; -100 makes the channel x itself); "
        "needs channels >= 160, 3 x channels >= 80 x thresholds and "
        "embedding_dim = 2 x 80 x thresholds (all kinds). None of the three --stats-* options: random "
        "initialisation (or --init).",
    )
    stats_framegain_db: tuple[float, ...] = Field(
        (),
        description="Statistics initialisation: thresholds of the per-frame spectral shape "
        "x_b - mean over bands (loudness removed).",
    )
    stats_delta_db: tuple[float, ...] = Field(
        (), description="Statistics initialisation: thresholds of the first difference x(t+1) - x(t-1)."
    )
    split: str = Field("train", description="Split of metadata.csv to train on (each baby_id a class).")
    val_split: str | None = Field(
        "dev", description="Split whose pairs are scored after each epoch; None: no validation."
    )
    select: Literal["dev", "cv", "last"] = Field(
        "dev",
        description="Keep the epoch with the best dev EER (the paper), the best cross-validated EER on the "
        "training split (5 folds of infants, back-end refitted, pseudo-pairs of files; dev untouched), "
        "or the last epoch.",
    )
    backend: Literal["none", "lda", "wccn"] = Field(
        "none", description="Linear back-end fitted after training."
    )
    backend_dims: int = Field(20, ge=1, le=1024, description="LDA output dimensions.")
    backend_bandlimit: bool = Field(
        False,
        description="Also fit the back-end on 8 kHz band-limited copies of the training files "
        "(on donateacry-cc such copies hurt the dev EER; see bench/train_experiments.py).",
    )
    gmm_components: int = Field(
        0,
        ge=0,
        le=1024,
        description="Also fit a GMM-supervector branch with a UBM of this many diagonal components on "
        "cepstra "
        "of the normalised log-mel (cryid.models.training.gmm_branch), fused with the back-end's output "
        "inside the exported graph; 0: no branch. Needs --backend lda.",
    )
    gmm_dims: int = Field(80, ge=1, le=1024, description="LDA output dimensions of the GMM branch.")
    gmm_ubms: int = Field(
        1,
        ge=1,
        le=16,
        description="UBMs in the GMM branch, each from its own random start with its own LDA; their cosines "
        "are averaged (one UBM's figures depend on its draw). The branch embedding has gmm_ubms x gmm_dims "
        "dimensions.",
    )
    seed: int = Field(0, ge=0, description="Random seed (weights, chunks, augmentation).")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:N.")
    threads: int | None = Field(
        None, ge=1, le=256, description="torch CPU threads; None keeps torch's default."
    )


class CalibrateSettings(StrictModel):
    """How ``cryid model calibrate`` fits; each default is written here once."""

    split: str = Field("dev", min_length=1, description="Split of infants the model was not trained on.")
    room_size: int = Field(8, ge=2, le=1000, description="Babies per room of the operating point.")
    room_strangers: int | None = Field(
        None, ge=0, le=1000, description="Of them not enrolled (None: a quarter of the room)."
    )
    rooms: int = Field(300, ge=10, le=100_000, description="Seeded rooms per fit and per evaluation.")
    seed: int = Field(0, ge=0, description="Seed of the rooms, the folds and the confirmations.")
    folds: int = Field(5, ge=2, le=100, description="Cross-validation folds over infants.")
    target_wrong_rate: float = Field(
        0.05, gt=0.0, lt=1.0, description="Highest CV wrong-baby rate the recommended min_confidence allows."
    )
    min_named: int = Field(
        20,
        ge=1,
        description="Below this many named CV queries, wrong names are capped at "
        "target_wrong_rate * min_named instead of the rate.",
    )
    weight_grid: tuple[float, ...] = Field(
        (0.0, 0.25, 0.5, 0.75, 1.0), min_length=1, description="confirmed_weight values tried by CV (K=1)."
    )
    bootstrap: int = Field(1000, ge=0, le=100_000, description="Infant resamples for the 95% intervals.")

    @property
    def strangers(self) -> int:
        return self.room_size // 4 if self.room_strangers is None else self.room_strangers
