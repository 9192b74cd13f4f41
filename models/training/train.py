"""``cryid model train``: the CryCeleb recipe with speechbrain, from scratch or fine-tuning.

Fbank(80) -> InputNormalization(sentence, std_norm=False) -> ECAPA-TDNN -> AAM-softmax (margin 0.2,
scale 30), Adam; each step draws a random 3-5 s chunk of every sampled (baby, period)'s concatenated
cries (one chunk length per batch). After each epoch the dev pairs are scored with the CryCeleb
protocol (one embedding per concatenated baby-period, cosine B vs D, EER); the best epoch is written
in speechbrain's Hugging Face layout (``hyperparams.yaml``, ``embedding_model.ckpt``,
``mean_var_norm_emb.ckpt``, ``classifier.ckpt``, ``label_encoder.txt``) that ``cryid model export``
reads, with ``train_info.json`` (the command, the settings, per-epoch metrics). ``train_state.pt``
holds model, optimiser, epoch and random states, so an interrupted run resumes where it stopped.
Optionally an LDA back-end (``cryid.models.training.backend``) is fitted on the training embeddings of the
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
from typing import Any

import numpy as np

from cryid.models.audio import SAMPLE_RATE, load_audio
from cryid.models.training.backend import BackendSettings, cross_validated_eer, fit_backend
from cryid.models.training.checkpoint import STATE_NAME, RunState, load_checkpoint, save_checkpoint
from cryid.models.training.gmm_branch import BRANCH_NAME, GmmBranch, fit_branch, fuse
from cryid.models.training.settings import TrainSettings
from cryid.models.training.train_parts import (
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
    save_speechbrain_dir,
    set_global_input_norm,
    stats_init,
    validate,
)

logger = logging.getLogger(__name__)

INFO_NAME = "train_info.json"


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


@dataclass(frozen=True)
class TrainRun:
    """The fixed parts of one training run: its data, the speechbrain modules on their device, the
    optimiser and loss, and the folder it writes."""

    settings: TrainSettings
    out: Path
    init: str | None
    device: str
    keep: int  # mel bands the network sees (kept_mel_bins of settings.max_freq_hz)
    items: list[Item]
    ds: Any  # the CryCeleb set (helper D's reader): validation pairs
    labels: list[str]  # class index -> baby_id
    hp: dict[str, Any]  # hyperpyyaml modules: mean_var_norm, embedding_model, classifier, ...
    text: str  # hyperparams.yaml saved with each candidate
    optimizer: Any
    loss_fn: Any

    @property
    def state_path(self) -> Path:
        return self.out / STATE_NAME


def read_items(data_dir: Path, split: str) -> tuple[list[Item], Any]:
    """The (baby, period) groups of ``split`` and the data set (helper D's CryCeleb reader)."""
    from cryid.models.evaluation.cryceleb import load_cryceleb

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
        from cryid.models.training.speechbrain_io import load_encoder_classifier, resolve_source

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


def _training_files(run: TrainRun) -> tuple[list[np.ndarray], list[str]]:
    """Every training file's audio and its infant, read once for the back-end and the GMM branch."""
    files = [(it.baby_id, f) for it in run.items for f in it.files]
    return [load_audio(f) for _, f in files], [b for b, _ in files]


def _fit_backend(
    run: TrainRun, wavs: list[np.ndarray], labels: list[str]
) -> tuple[Any, np.ndarray, tuple[np.ndarray, list[str]]]:
    """Embed every training file (and band-limited copies) and fit the configured back-end on them."""
    import torch
    import torchaudio.functional as taf

    hp, settings, device, keep = run.hp, run.settings, run.device, run.keep
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


def _fit_gmm_branch(run: TrainRun, wavs: list[np.ndarray], labels: list[str]) -> GmmBranch:
    """The GMM-supervector branch, fitted on the normalised features the network sees of every training
    file (each infant a class)."""
    import torch

    feats = []
    with torch.no_grad():
        for wav in wavs:
            x = torch.from_numpy(wav)[None].to(run.device)
            feats.append(features(run.hp, x, torch.ones(1, device=run.device), run.keep)[0].cpu().numpy())
    s = run.settings
    return fit_branch(feats, labels, s.gmm_components, s.gmm_dims, seed=s.seed, members=s.gmm_ubms)


def _validate_with_backend(run: TrainRun, backend: Any, branch: GmmBranch | None = None) -> dict[str, float]:
    """Dev metrics of embedding + back-end (the exported model's view)."""
    model = run.hp["embedding_model"]

    class _WithBackend:
        def __init__(self) -> None:
            self.training = model.training

        def eval(self) -> None:
            model.eval()

        def train(self, mode: bool) -> None:
            model.train(mode)

        def __call__(self, feats: Any) -> Any:
            import torch

            e = backend.apply(model(feats)[0, 0].cpu().numpy())
            if branch is not None:
                e = fuse(e, branch.embed(feats[0].cpu().numpy()))[0]
            return torch.from_numpy(e)[None, None]

    view = dict(run.hp)
    view["embedding_model"] = _WithBackend()
    return validate(view, run.ds, run.settings.val_split, run.device, run.keep)


def train(
    settings: TrainSettings,
    data_dir: Path,
    out_dir: Path,
    init: str | None = None,
    command: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train (or resume training) into ``out_dir``; returns the chosen epoch and its dev metrics."""
    run = prepare_run(settings, Path(data_dir), Path(out_dir), init)
    state = load_checkpoint(run)
    if state is None:
        state = RunState()
        random.seed(settings.seed)
        np.random.seed(settings.seed)
    audio = [load_item(it) for it in run.items]
    aug = Augmenter(settings, seed=settings.seed)
    t0 = time.monotonic()
    if state.epoch == 0 and settings.epochs == 0:
        state.history.append({"epoch": 0, "loss": None})
    for epoch in range(state.epoch + 1, settings.epochs + 1):
        loss, emb_mean = run_epoch(run, epoch, audio, aug, progress)
        record: dict[str, Any] = {"epoch": epoch, "loss": loss, "elapsed_s": time.monotonic() - t0}
        state.history.append(record)
        _end_of_epoch(run, record, emb_mean)
        if _better(record, state.best, settings.select):
            state.best = _best_of(record)
            _promote(run.out)
        logger.info("epoch %s: %s", epoch, record)
        state.epoch = epoch
        save_checkpoint(run, state)
    if settings.epochs == 0:
        record = state.history[-1]
        _end_of_epoch(run, record, None)
        state.best = _best_of(record)
        _promote(run.out)
    return _finish(run, state, command)


def prepare_run(settings: TrainSettings, data_dir: Path, out_dir: Path, init: str | None) -> TrainRun:
    """Check the settings, read the data, build the modules on their device, the optimiser and the loss,
    and create ``out_dir``."""
    import torch
    from speechbrain.nnet.losses import AdditiveAngularMargin, LogSoftmaxWrapper

    if settings.chunk_min_s > settings.chunk_max_s:
        raise TrainError(f"--chunk-min-s {settings.chunk_min_s} exceeds --chunk-max-s {settings.chunk_max_s}")
    if settings.gmm_components and settings.backend != "lda":
        raise TrainError(
            f"--gmm-components {settings.gmm_components} needs --backend lda (the branch is fused with the "
            f"LDA's output), not --backend {settings.backend}"
        )
    device = resolve_device(settings.device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    items, ds = read_items(data_dir, settings.split)
    if settings.val_split is not None:
        ds.read_pairs(settings.val_split)  # fail now, not after the first epoch
    labels = sorted({it.baby_id for it in items})
    out_dir.mkdir(parents=True, exist_ok=True)
    hp, text = build_modules(settings, len(labels), init)
    keep = kept_mel_bins(settings.max_freq_hz)
    if settings.input_norm == "global":
        set_global_input_norm(hp, [load_audio(f) for it in items for f in it.files])
    for name in ("mean_var_norm", "embedding_model", "classifier", "mean_var_norm_emb"):
        hp[name].to(device)
    params = list(hp["embedding_model"].parameters()) + list(hp["classifier"].parameters())
    return TrainRun(
        settings=settings,
        out=out_dir,
        init=init,
        device=device,
        keep=keep,
        items=items,
        ds=ds,
        labels=labels,
        hp=hp,
        text=text,
        optimizer=torch.optim.Adam(params, lr=settings.lr),
        loss_fn=LogSoftmaxWrapper(AdditiveAngularMargin(margin=settings.margin, scale=settings.scale)),
    )


def run_epoch(
    run: TrainRun, epoch: int, audio: list[np.ndarray], aug: Augmenter, progress: bool = True
) -> tuple[float, np.ndarray]:
    """One epoch: every baby-period ``chunks_per_item`` times in a seeded order, a random chunk length per
    batch, augmentation, one AAM-softmax step per batch. Returns the mean loss and the mean training
    embedding."""
    import torch
    from tqdm import tqdm

    settings, hp, device = run.settings, run.hp, run.device
    label_index = {b: i for i, b in enumerate(run.labels)}
    rng = np.random.default_rng([settings.seed, epoch])
    aug.rng = np.random.default_rng([settings.seed, epoch, 1])
    order = rng.permutation(np.repeat(np.arange(len(run.items)), settings.chunks_per_item))
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
        emb = hp["embedding_model"](features(hp, wavs, lens, run.keep), lens)
        targets = torch.tensor([[label_index[run.items[i].baby_id]] for i in idx], device=device)
        loss = run.loss_fn(hp["classifier"](emb), targets)
        run.optimizer.zero_grad()
        loss.backward()
        run.optimizer.step()
        losses.append(float(loss.detach()))
        emb_sum = emb_sum + emb.detach()[:, 0].sum(0).float().cpu().numpy()
        emb_count += len(idx)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return float(np.mean(losses)), emb_sum / emb_count


CANDIDATE = ".candidate"
MODEL_FILES = (
    "hyperparams.yaml",
    "mean_var_norm.ckpt",
    "embedding_model.ckpt",
    "mean_var_norm_emb.ckpt",
    "classifier.ckpt",
    "label_encoder.txt",
    "backend.npz",
    BRANCH_NAME,
)


def _end_of_epoch(run: TrainRun, record: dict[str, Any], emb_mean: np.ndarray | None) -> None:
    """Write this epoch's model (and back-end) into ``out/.candidate`` and validate it."""
    settings = run.settings
    cand = run.out / CANDIDATE
    if cand.exists():
        shutil.rmtree(cand)
    cand.mkdir()
    backend, train_embs, branch = (None, None, None)
    if settings.backend != "none" or emb_mean is None or settings.select == "cv":
        wavs, labels = _training_files(run)
        backend, train_embs, (x, y) = _fit_backend(run, wavs, labels)
        kind = "center" if settings.backend == "none" else settings.backend
        n = len(train_embs)  # originals only: a band-limited copy of an enrolled file is no fair trial
        record["train_cv_eer"] = cross_validated_eer(
            x[:n], y[:n], BackendSettings(kind=kind, dims=settings.backend_dims)
        )
        if settings.gmm_components:  # needs --backend lda (prepare_run), so always in this branch
            branch = _fit_gmm_branch(run, wavs, labels)
    mean = train_embs if train_embs is not None else emb_mean[None]
    save_speechbrain_dir(run.hp, run.text, run.labels, cand, mean)
    if backend is not None:
        backend.save(cand / "backend.npz")
    if branch is not None:
        branch.save(cand / BRANCH_NAME)
    if settings.val_split is not None:
        record["val_raw"] = validate(run.hp, run.ds, settings.val_split, run.device, run.keep)
        record["val"] = (
            _validate_with_backend(run, backend, branch) if backend is not None else record["val_raw"]
        )


def _promote(out: Path) -> None:
    """The candidate becomes the model in ``out`` (file by file, each an atomic rename)."""
    cand = out / CANDIDATE
    for name in MODEL_FILES:
        if (cand / name).is_file():
            (cand / name).replace(out / name)
        elif (out / name).is_file():
            (out / name).unlink()


def _finish(run: TrainRun, state: RunState, command: str | None) -> TrainResult:
    """Write ``train_info.json`` (the command, the settings, every epoch) for the chosen epoch."""
    out, settings, history = run.out, run.settings, state.history
    cand = out / CANDIDATE
    if cand.exists():
        shutil.rmtree(cand)
    best = state.best or {"epoch": history[-1]["epoch"] if history else 0}
    metrics = {k: float(v) for k, v in best.items() if k != "epoch"}
    info = {
        "command": command,
        "init": run.init,
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
