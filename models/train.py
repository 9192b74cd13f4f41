"""``cryid model train``: the CryCeleb recipe with speechbrain, from scratch or fine-tuning.

Fbank(80) -> InputNormalization(sentence, std_norm=False) -> ECAPA-TDNN -> AAM-softmax (margin 0.2,
scale 30), Adam; each step draws a random 3-5 s chunk of every sampled (baby, period)'s concatenated
cries (one chunk length per batch). After each epoch the dev pairs are scored with the CryCeleb
protocol (one embedding per concatenated baby-period, cosine B vs D, EER); the best epoch is written
in speechbrain's Hugging Face layout (``hyperparams.yaml``, ``embedding_model.ckpt``,
``mean_var_norm_emb.ckpt``, ``classifier.ckpt``, ``label_encoder.txt``) that ``cryid model export``
reads, with ``train_info.json`` (the command, the settings, per-epoch metrics). ``train_state.pt``
holds model, optimiser, epoch and random states, so an interrupted run resumes where it stopped.
Optionally an LDA back-end (``cryid.models.backend``) is fitted on the training embeddings of the
chosen epoch and saved as ``backend.npz`` beside it; the export appends it to the ONNX graph.

torch and speechbrain are imported lazily (the ``train`` extra); the runtime never imports this module.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from cryid.models.audio import SAMPLE_RATE, load_audio
from cryid.models.backend import BackendSettings, cross_validated_eer, fit_backend
from cryid.models.strict import StrictModel
from cryid.models.train_parts import (
    GLOBAL_NORM_LOADABLE,
    GLOBAL_NORM_PATH,
    HYPERPARAMS_TEMPLATE,
    N_MELS,
    Augmenter,
    TrainError,
    chunk,
    embed_waves,
    features,
    kept_mel_bins,
    rng_state,
    save_speechbrain_dir,
    set_global_input_norm,
    set_rng_state,
    stats_init,
    validate,
)

logger = logging.getLogger(__name__)

STATE_NAME = "train_state.pt"
INFO_NAME = "train_info.json"


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
        "the normalised log-mel x for these thresholds t (dB) (cryid.models.train_parts.stats_init; -100 "
        "makes the channel x itself); needs channels >= 160, 3 x channels >= 80 x thresholds and "
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
    seed: int = Field(0, ge=0, description="Random seed (weights, chunks, augmentation).")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:N.")
    threads: int | None = Field(
        None, ge=1, le=256, description="torch CPU threads; None keeps torch's default."
    )


@dataclass(frozen=True)
class Item:
    """One (baby, period) of the training split: its cries concatenated in chronological order."""

    baby_id: str
    period: str
    files: tuple[Path, ...]


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    best_epoch: int
    metrics: dict[str, float]


def read_items(data_dir: Path, split: str) -> tuple[list[Item], Any]:
    """The (baby, period) groups of ``split`` and the data set (helper D's CryCeleb reader)."""
    from cryid.models.cryceleb import load_cryceleb

    ds = load_cryceleb(data_dir)
    ds.check_audio(split)
    groups = ds.groups(split)
    if len(groups) < 2:
        raise TrainError(
            f"{data_dir}: split {split!r} has {len(groups)} baby-periods; training needs at least 2"
        )
    items = [Item(b, p, tuple(r.path for r in recs)) for (b, p), recs in groups.items()]
    return items, ds


def load_item(item: Item) -> np.ndarray:
    return np.concatenate([load_audio(p) for p in item.files]).astype(np.float32)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"device {name!r} asked for but torch sees no CUDA GPU; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise TrainError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    return name


def _hparams_text(settings: TrainSettings, n_classes: int, init_dir: Path | None) -> str:
    """hyperparams.yaml of the trained model: the init source's (new class count) or the template."""
    import re

    if init_dir is not None:
        if settings.input_norm != "sentence":
            raise TrainError(
                "--input-norm global needs a new network; --init keeps the source's own normalisation"
            )
        text = (init_dir / "hyperparams.yaml").read_text(encoding="utf-8")
        text, n = re.subn(r"^out_n_neurons:.*$", f"out_n_neurons: {n_classes}", text, flags=re.MULTILINE)
        if n != 1:
            raise TrainError(
                f"{init_dir}/hyperparams.yaml has no `out_n_neurons:` line to set the class count"
            )
        return re.sub(r"^pretrained_path:.*$", "pretrained_path: cryid-trained", text, flags=re.MULTILINE)
    c = settings.channels
    if c % 8:
        raise TrainError(f"--channels {c} is not a multiple of 8 (the Res2Net blocks split channels in 8)")
    glob = settings.input_norm == "global"
    return HYPERPARAMS_TEMPLATE.format(
        pretrained_path="cryid-trained",
        n_classes=n_classes,
        c=c,
        c3=3 * c,
        emb=settings.embedding_dim,
        input_norm=settings.input_norm,
        norm_loadable=GLOBAL_NORM_LOADABLE if glob else "",
        norm_path=GLOBAL_NORM_PATH if glob else "",
    )


def build_modules(
    settings: TrainSettings, n_classes: int, init_src: str | None
) -> tuple[dict[str, Any], str]:
    """Fbank, sentence normalisation, ECAPA-TDNN (fresh or from ``init_src``) and a new classifier."""
    import torch
    from hyperpyyaml import load_hyperpyyaml

    init_dir = None
    if init_src is not None:
        from cryid.models.speechbrain_io import load_encoder_classifier, resolve_source

        init_dir = resolve_source(init_src)
    text = _hparams_text(settings, n_classes, init_dir)
    torch.manual_seed(settings.seed)
    hp = load_hyperpyyaml(text)
    if init_dir is not None:
        clf = load_encoder_classifier(init_src)
        hp["embedding_model"].load_state_dict(clf.mods.embedding_model.state_dict())
    emb = hp["embedding_model"]
    keep = kept_mel_bins(settings.max_freq_hz)
    if settings.stats_init_db or settings.stats_framegain_db or settings.stats_delta_db:
        if init_dir is not None:
            raise TrainError("--stats-init-db and --init both set the starting weights; give one of them")
        if keep < N_MELS:
            raise TrainError("--stats-init-db uses all 80 bands; drop --max-freq-hz")
        stats_init(emb, settings.stats_init_db, settings.stats_framegain_db, settings.stats_delta_db)
    if keep < N_MELS:
        with torch.no_grad():
            emb.blocks[0].conv.conv.weight[:, keep:, :] = 0.0
    return hp, text


RESUMABLE_CHANGES = ("epochs", "device", "threads", "select")


def _run_identity(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must share with the interrupted one (more epochs may be asked for)."""
    return {k: v for k, v in settings.items() if k not in RESUMABLE_CHANGES}


def _best_of(record: dict[str, Any]) -> dict[str, Any]:
    best = {**record.get("val", {}), "epoch": record["epoch"]}
    if "train_cv_eer" in record:
        best["train_cv_eer"] = record["train_cv_eer"]
    return best


def _better(record: dict[str, Any], best: dict[str, Any] | None, select: str) -> bool:
    if best is None or select == "last":
        return True
    if select == "cv":
        return record["train_cv_eer"] < best.get("train_cv_eer", 1.0)
    return record.get("val", {}).get("eer", 1.0) < best.get("eer", 1.0)


def _fit_backend(
    hp: dict[str, Any], items: list[Item], settings: TrainSettings, device: str, keep: int
) -> tuple[Any, np.ndarray, tuple[np.ndarray, list[str]]]:
    """Embed every training file (and band-limited copies) and fit the configured back-end on them."""
    import torch
    import torchaudio.functional as taf

    files = [(it.baby_id, f) for it in items for f in it.files]
    wavs = [load_audio(f) for _, f in files]
    labels = [b for b, _ in files]
    embs = embed_waves(hp, wavs, device, keep)
    x, y = embs, labels
    if settings.backend == "none":
        return None, embs, (x, y)
    if settings.backend_bandlimit:
        bl = [
            taf.resample(taf.resample(torch.from_numpy(w), SAMPLE_RATE, 8000), 8000, SAMPLE_RATE).numpy()
            for w in wavs
        ]
        x = np.concatenate([embs, embed_waves(hp, bl, device, keep)])
        y = labels + labels
    backend = fit_backend(x, y, BackendSettings(kind=settings.backend, dims=settings.backend_dims))
    return backend, embs, (x, y)


def _validate_with_backend(
    hp: dict[str, Any], ds: Any, settings: TrainSettings, device: str, keep: int, backend: Any
) -> dict[str, float]:
    """Dev metrics of embedding + back-end (the exported model's view)."""
    model = hp["embedding_model"]

    class _WithBackend:
        def __init__(self) -> None:
            self.training = model.training

        def eval(self) -> None:
            model.eval()

        def train(self, mode: bool) -> None:
            model.train(mode)

        def __call__(self, feats: Any) -> Any:
            import torch

            e = model(feats)[0, 0].cpu().numpy()
            return torch.from_numpy(backend.apply(e))[None, None]

    view = dict(hp)
    view["embedding_model"] = _WithBackend()
    return validate(view, ds, settings.val_split, device, keep)


def train(
    settings: TrainSettings,
    data_dir: Path,
    out_dir: Path,
    init: str | None = None,
    command: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train (or resume training) into ``out_dir``; returns the chosen epoch and its dev metrics."""
    import torch
    from speechbrain.nnet.losses import AdditiveAngularMargin, LogSoftmaxWrapper
    from tqdm import tqdm

    if settings.chunk_min_s > settings.chunk_max_s:
        raise TrainError(f"--chunk-min-s {settings.chunk_min_s} exceeds --chunk-max-s {settings.chunk_max_s}")
    device = resolve_device(settings.device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    items, ds = read_items(Path(data_dir), settings.split)
    if settings.val_split is not None:
        ds.read_pairs(settings.val_split)  # fail now, not after the first epoch
    labels = sorted({it.baby_id for it in items})
    label_index = {b: i for i, b in enumerate(labels)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_NAME
    hp, text = build_modules(settings, len(labels), init)
    keep = kept_mel_bins(settings.max_freq_hz)
    if settings.input_norm == "global":
        set_global_input_norm(hp, [load_audio(f) for it in items for f in it.files])
    for name in ("mean_var_norm", "embedding_model", "classifier", "mean_var_norm_emb"):
        hp[name].to(device)
    params = list(hp["embedding_model"].parameters()) + list(hp["classifier"].parameters())
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    loss_fn = LogSoftmaxWrapper(AdditiveAngularMargin(margin=settings.margin, scale=settings.scale))
    start_epoch, history, best = 1, [], None
    if state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=False)
        if _run_identity(state["settings"]) != _run_identity(settings.model_dump(mode="json")) or (
            state["labels"] != labels or state["init"] != init
        ):
            raise TrainError(
                f"{out} holds a run with other settings or data; pass a new --out or delete {state_path}"
            )
        hp["embedding_model"].load_state_dict(state["embedding_model"])
        hp["classifier"].load_state_dict(state["classifier"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start_epoch, history, best = state["epoch"] + 1, state["history"], state["best"]
        logger.info("resuming %s after epoch %s", out, state["epoch"])
    else:
        random.seed(settings.seed)
        np.random.seed(settings.seed)
    audio = [load_item(it) for it in items]
    aug = Augmenter(settings, seed=settings.seed)
    t0 = time.monotonic()
    if start_epoch == 1 and settings.epochs == 0:
        history.append({"epoch": 0, "loss": None})
    for epoch in range(start_epoch, settings.epochs + 1):
        rng = np.random.default_rng([settings.seed, epoch])
        aug.rng = np.random.default_rng([settings.seed, epoch, 1])
        order = rng.permutation(np.repeat(np.arange(len(items)), settings.chunks_per_item))
        hp["embedding_model"].train()
        hp["classifier"].train()
        losses, emb_sum, emb_count = [], 0.0, 0
        batches = range(0, len(order), settings.batch_size)
        bar = tqdm(batches, desc=f"epoch {epoch}/{settings.epochs}", disable=not progress, leave=False)
        for start in bar:
            idx = order[start : start + settings.batch_size]
            length = int(rng.uniform(settings.chunk_min_s, settings.chunk_max_s) * SAMPLE_RATE)
            wavs = torch.from_numpy(np.stack([chunk(audio[i], length, rng) for i in idx])).to(device)
            wavs = aug(wavs)
            lens = torch.ones(len(idx), device=device)
            emb = hp["embedding_model"](features(hp, wavs, lens, keep), lens)
            targets = torch.tensor([[label_index[items[i].baby_id]] for i in idx], device=device)
            loss = loss_fn(hp["classifier"](emb), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            emb_sum = emb_sum + emb.detach()[:, 0].sum(0).float().cpu().numpy()
            emb_count += len(idx)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        record: dict[str, Any] = {
            "epoch": epoch,
            "loss": float(np.mean(losses)),
            "elapsed_s": time.monotonic() - t0,
        }
        history.append(record)
        _end_of_epoch(hp, text, labels, items, ds, settings, device, keep, record, out, emb_sum / emb_count)
        if _better(record, best, settings.select):
            best = _best_of(record)
            _promote(out)
        logger.info("epoch %s: %s", epoch, record)
        torch.save(
            {
                "settings": settings.model_dump(mode="json"),
                "labels": labels,
                "init": init,
                "epoch": epoch,
                "embedding_model": hp["embedding_model"].state_dict(),
                "classifier": hp["classifier"].state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": rng_state(),
                "history": history,
                "best": best,
            },
            out / (STATE_NAME + ".tmp"),
        )
        (out / (STATE_NAME + ".tmp")).replace(state_path)
    if settings.epochs == 0:
        record = history[-1]
        _end_of_epoch(hp, text, labels, items, ds, settings, device, keep, record, out, None)
        best = _best_of(record)
        _promote(out)
    return _finish(out, settings, init, command, history, best)


CANDIDATE = ".candidate"
MODEL_FILES = (
    "hyperparams.yaml",
    "mean_var_norm.ckpt",
    "embedding_model.ckpt",
    "mean_var_norm_emb.ckpt",
    "classifier.ckpt",
    "label_encoder.txt",
    "backend.npz",
)


def _end_of_epoch(
    hp: dict[str, Any],
    text: str,
    labels: list[str],
    items: list[Item],
    ds: Any,
    settings: TrainSettings,
    device: str,
    keep: int,
    record: dict[str, Any],
    out: Path,
    emb_mean: np.ndarray | None,
) -> None:
    """Write this epoch's model (and back-end) into ``out/.candidate`` and validate it."""
    cand = out / CANDIDATE
    if cand.exists():
        shutil.rmtree(cand)
    cand.mkdir()
    backend, train_embs = (None, None)
    if settings.backend != "none" or emb_mean is None or settings.select == "cv":
        backend, train_embs, (x, y) = _fit_backend(hp, items, settings, device, keep)
        kind = "center" if settings.backend == "none" else settings.backend
        n = len(train_embs)  # originals only: a band-limited copy of an enrolled file is no fair trial
        record["train_cv_eer"] = cross_validated_eer(
            x[:n], y[:n], BackendSettings(kind=kind, dims=settings.backend_dims)
        )
    save_speechbrain_dir(hp, text, labels, cand, train_embs if train_embs is not None else emb_mean[None])
    if backend is not None:
        backend.save(cand / "backend.npz")
    if settings.val_split is not None:
        record["val_raw"] = validate(hp, ds, settings.val_split, device, keep)
        record["val"] = (
            _validate_with_backend(hp, ds, settings, device, keep, backend)
            if backend is not None
            else record["val_raw"]
        )


def _promote(out: Path) -> None:
    """The candidate becomes the model in ``out`` (file by file, each an atomic rename)."""
    cand = out / CANDIDATE
    for name in MODEL_FILES:
        if (cand / name).is_file():
            (cand / name).replace(out / name)
        elif (out / name).is_file():
            (out / name).unlink()


def _finish(
    out: Path,
    settings: TrainSettings,
    init: str | None,
    command: str | None,
    history: list[dict[str, Any]],
    best: dict[str, Any] | None,
) -> TrainResult:
    cand = out / CANDIDATE
    if cand.exists():
        shutil.rmtree(cand)
    best = best or {"epoch": history[-1]["epoch"] if history else 0}
    metrics = {k: float(v) for k, v in best.items() if k != "epoch"}
    info = {
        "command": command,
        "init": init,
        "settings": settings.model_dump(mode="json"),
        "best_epoch": int(best["epoch"]),
        "metrics": {
            k if k.startswith("train_") else f"{settings.val_split}_{k}": v for k, v in metrics.items()
        },
        "epochs": history,
    }
    tmp = out / (INFO_NAME + ".tmp")
    tmp.write_text(json.dumps(info, indent=1), encoding="utf-8")
    tmp.replace(out / INFO_NAME)
    logger.info("chose epoch %s of %s: %s", best["epoch"], out, metrics)
    return TrainResult(out_dir=out, best_epoch=int(best["epoch"]), metrics=metrics)
