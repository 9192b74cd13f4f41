"""speechbrain model sources: a local Hugging Face-layout directory or a hub id (torch imported lazily).

A source holds ``hyperparams.yaml`` (modules ``compute_features``, ``mean_var_norm``,
``embedding_model``, ... and a ``pretrainer``) and the checkpoints it names, at least
``embedding_model.ckpt``. A hub id (``speechbrain/spkrec-ecapa-voxceleb``,
``Ubenwa/ecapa-voxceleb-ft2-cryceleb``) is downloaded with huggingface_hub.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryid.models.manifest import ModelError

if TYPE_CHECKING:
    from speechbrain.inference.speaker import EncoderClassifier

logger = logging.getLogger(__name__)

HPARAMS_NAME = "hyperparams.yaml"
REQUIRED_FILES = (HPARAMS_NAME, "embedding_model.ckpt")
HUB_FILES = (
    HPARAMS_NAME,
    "embedding_model.ckpt",
    "mean_var_norm_emb.ckpt",
    "classifier.ckpt",
    "label_encoder.txt",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_dir(path: Path, src: str) -> Path:
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise ModelError(
            f"{src}: not a speechbrain model directory, {', '.join(missing)} missing; "
            f"SRC must hold {', '.join(HUB_FILES)} (the Hugging Face layout)"
        )
    return path


def resolve_source(src: str) -> Path:
    """A local directory in the Hugging Face layout for ``src`` (a directory or a hub id)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return _check_dir(path, src)
    if path.exists():
        raise ModelError(f"{src}: is a file; SRC must be a speechbrain model directory or a hub id")
    if not _HUB_ID.match(src) or src.startswith((".", "/", "~")):
        raise ModelError(
            f"{src}: no such directory and not a Hugging Face hub id (owner/name); "
            "give a speechbrain model directory or an id such as speechbrain/spkrec-ecapa-voxceleb"
        )
    hint = (
        f"download {', '.join(HUB_FILES)} from https://huggingface.co/{src} into a folder "
        "(e.g. models/sources/" + src.replace("/", "--") + ") and pass that folder as SRC"
    )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise ModelError(
            f"{src}: huggingface_hub is not installed (pip install 'cryid[train]'), or {hint}"
        ) from exc
    try:
        local = snapshot_download(repo_id=src)  # whole repo: hyperparams.yaml may name extra files
    except Exception as exc:  # offline, unknown repo, auth: huggingface_hub has many error types
        first = str(exc).strip().split(". ")[0].splitlines()[0][:120] if str(exc).strip() else ""
        reason = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        raise ModelError(f"{src}: cannot download from the Hugging Face hub ({reason}); {hint}") from exc
    return _check_dir(Path(local), src)


def _overrides(hparams_text: str, local: Path) -> dict[str, Any]:
    """Point ``pretrained_path`` (as in the published hyperparams.yaml) at the local directory."""
    if re.search(r"^pretrained_path\s*:", hparams_text, flags=re.MULTILINE):
        return {"pretrained_path": str(local)}
    return {}


def load_encoder_classifier(src: str | Path) -> EncoderClassifier:
    """speechbrain's ``EncoderClassifier`` for ``src``, on the CPU, in eval mode."""
    local = resolve_source(str(src)).resolve()
    from speechbrain.inference.speaker import EncoderClassifier
    from speechbrain.utils.fetching import LocalStrategy

    text = (local / HPARAMS_NAME).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="cryid-sb-") as savedir:
        try:
            clf = EncoderClassifier.from_hparams(
                source=str(local),
                savedir=savedir,
                overrides=_overrides(text, local),
                local_strategy=LocalStrategy.NO_LINK,
                run_opts={"device": "cpu"},
            )
        except ModelError:
            raise
        except Exception as exc:  # yaml, missing checkpoints, shape mismatches: report in one line
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"{src}: speechbrain cannot load this model ({type(exc).__name__}: {reason[:200]}); "
                "check hyperparams.yaml and the checkpoints"
            ) from exc
    if clf is None or not hasattr(clf.mods, "embedding_model"):
        raise ModelError(f"{src}: hyperparams.yaml defines no embedding_model module")
    clf.eval()
    logger.info("loaded speechbrain model from %s", local)
    return clf
