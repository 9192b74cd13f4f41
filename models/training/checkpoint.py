"""``train_state.pt``: what an interrupted ``cryid model train`` resumes from.

The checkpoint holds the weights of the network and the classifier, the optimiser, the random states
and the ``RunState`` (epochs done, their records, the best so far); it is written after every epoch
(temporary file + rename). A run resumes only with the same settings, data and init source; more
epochs, another device or thread count, or another checkpoint choice may be asked for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryid.models.training.train_parts import TrainError, rng_state, set_rng_state

if TYPE_CHECKING:
    from cryid.models.training.train import TrainRun

logger = logging.getLogger(__name__)

STATE_NAME = "train_state.pt"

RESUMABLE_CHANGES = ("epochs", "device", "threads", "select")


def _run_identity(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must share with the interrupted one (more epochs may be asked for)."""
    return {k: v for k, v in settings.items() if k not in RESUMABLE_CHANGES}


@dataclass
class RunState:
    """What ``train_state.pt`` carries besides the weights: the last finished epoch, every epoch's record
    and the best so far."""

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None


def save_checkpoint(run: TrainRun, state: RunState) -> None:
    """Write ``train_state.pt`` (weights, optimiser, random states, ``state``) atomically."""
    import torch

    tmp = run.out / (STATE_NAME + ".tmp")
    torch.save(
        {
            "settings": run.settings.model_dump(mode="json"),
            "labels": run.labels,
            "init": run.init,
            "epoch": state.epoch,
            "embedding_model": run.hp["embedding_model"].state_dict(),
            "classifier": run.hp["classifier"].state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "rng": rng_state(),
            "history": state.history,
            "best": state.best,
        },
        tmp,
    )
    tmp.replace(run.state_path)


def load_checkpoint(run: TrainRun) -> RunState | None:
    """Resume from ``train_state.pt`` if ``run.out`` holds one of the same run (weights, optimiser and
    random states restored); None when there is none."""
    import torch

    if not run.state_path.is_file():
        return None
    saved = torch.load(run.state_path, map_location=run.device, weights_only=False)
    if _run_identity(saved["settings"]) != _run_identity(run.settings.model_dump(mode="json")) or (
        saved["labels"] != run.labels or saved["init"] != run.init
    ):
        raise TrainError(
            f"{run.out} holds a run with other settings or data; pass a new --out or delete {run.state_path}"
        )
    run.hp["embedding_model"].load_state_dict(saved["embedding_model"])
    run.hp["classifier"].load_state_dict(saved["classifier"])
    run.optimizer.load_state_dict(saved["optimizer"])
    set_rng_state(saved["rng"])
    logger.info("resuming %s after epoch %s", run.out, saved["epoch"])
    return RunState(epoch=saved["epoch"], history=saved["history"], best=saved["best"])
