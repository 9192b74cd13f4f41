"""Back-end and embedding experiments for the default model (issue 6): cheap proxies on cached features.

    nice -n 10 .venv/bin/python bench/train_experiments.py --data ../shared/data/donateacry-cc \
        --cache /work/runs/cache [--ckpt DIR ...]

For each embedding (raw Fbank mean+std as the data README's reference, random-init ECAPA-TDNN,
statistics-initialised ECAPA-TDNN (`cryid.models.training.train_parts.stats_init`) with sentence or global
input normalisation (`ecapa_stats_global` is the shipped default's network), trained checkpoints
given with --ckpt; `--embeddings NAME...` picks some) and each back-end (none, LDA of several sizes,
with/without band-limited copies of the 16 kHz training recordings as extra same-class samples), it
prints
- cv_eer: 5-fold cross-validation on the TRAIN split (fit on 4/5 of the infants, score the rest with
  pseudo pairs: one recording of an infant vs its other recordings; same session, so optimistic),
- dev_eer, dev_eer_cm (channel-matched), dev_top1: the CryCeleb protocol on dev (one embedding per
  concatenated baby-period, cosine B vs D), top-1 = nearest B of each D among the 30 infants.
Selection is by cv_eer; dev is the confirmation. Outputs go to the cache folder, never the repository.
Its train CV shares one session per infant and rewards channel cues: issue 11's cross-session
selection (dev-CV over dev infants with bootstrap CIs, rooms of 8, a ward channel) is
`bench/model_search.py`.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

logger = logging.getLogger("train_experiments")


def read_rows(data: Path) -> list[dict[str, str]]:
    with open(data / "metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    prov = {}
    if (data / "provenance.csv").is_file():
        with open(data / "provenance.csv", newline="") as fh:
            prov = {r["file_id"]: r["recording"] for r in csv.DictReader(fh)}
    for r in rows:
        r["codec"] = prov.get(r["file_id"], "unknown")
    return rows


def band_limit(wav: np.ndarray, cutoff_hz: float = 4000.0, sr: int = 16000) -> np.ndarray:
    """Brick-wall low-pass in the FFT domain (an 8 kHz phone codec keeps nothing above 4 kHz)."""
    spec = np.fft.rfft(wav)
    freqs = np.fft.rfftfreq(len(wav), 1.0 / sr)
    spec[freqs > cutoff_hz] = 0
    return np.fft.irfft(spec, n=len(wav)).astype(np.float32)


def load_wavs(data: Path, rows: list[dict[str, str]], cache: Path) -> dict[str, np.ndarray]:
    path = cache / "wavs.npz"
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    import soundfile as sf

    wavs = {}
    for r in rows:
        wav, sr = sf.read(data / r["file_name"], dtype="float32")
        if sr != 16000:
            raise ValueError(f"{r['file_name']}: {sr} Hz")
        wavs[r["file_id"]] = wav
    np.savez(path, **wavs)
    return wavs


class Fbank:
    def __init__(self) -> None:
        import torch
        from speechbrain.lobes.features import Fbank as SBFbank

        self.torch = torch
        self.fb = SBFbank(n_mels=80)

    def __call__(self, wav: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            f = self.fb(self.torch.from_numpy(wav)[None])[0].numpy()
        return f  # raw log Fbank; the ECAPA applies sentence mean normalisation itself


def stats_embed(feats: np.ndarray, bins: int = 80) -> np.ndarray:
    f = feats[:, :bins]
    return np.concatenate([f.mean(0), f.std(0)])


class Ecapa:
    """Random-init (seeded) or checkpointed ECAPA-TDNN on Fbank features, each clip's own per-band mean
    removed (sentence) or one fixed per-band mean (``global_mean``: the training split's)."""

    def __init__(
        self,
        channels: int = 256,
        emb: int = 192,
        seed: int = 0,
        ckpt: Path | None = None,
        mask_bins: int = 80,
        stats_db: tuple[tuple[float, ...], ...] | None = None,
        global_mean: np.ndarray | None = None,
    ) -> None:
        import torch
        from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN

        self.torch = torch
        torch.manual_seed(seed)
        if ckpt is not None:  # a `cryid model train` output (speechbrain layout)
            from hyperpyyaml import load_hyperpyyaml

            hp = load_hyperpyyaml((ckpt / "hyperparams.yaml").read_text())
            self.model = hp["embedding_model"].eval()
            self.model.load_state_dict(torch.load(ckpt / "embedding_model.ckpt", map_location="cpu"))
        else:
            self.model = ECAPA_TDNN(80, channels=[channels] * 4 + [3 * channels], lin_neurons=emb).eval()
        if stats_db is not None:
            from cryid.models.training.train_parts import stats_init

            stats_init(self.model, *stats_db)  # (level, spectral shape, modulation) thresholds
        self.mask_bins = mask_bins
        self.global_mean = global_mean

    def __call__(self, feats: np.ndarray) -> np.ndarray:
        f = feats - (feats.mean(axis=0, keepdims=True) if self.global_mean is None else self.global_mean)
        f[:, self.mask_bins :] = 0
        with self.torch.no_grad():
            return self.model(self.torch.from_numpy(f)[None].float())[0, 0].numpy()


def eer(pos: np.ndarray, neg: np.ndarray) -> float:
    import torch
    from speechbrain.utils.metric_stats import EER

    return float(EER(torch.from_numpy(pos).float(), torch.from_numpy(neg).float())[0])


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--ckpt", type=Path, nargs="*", default=[])
    ap.add_argument("--embeddings", nargs="*", default=None, help="subset of embedding names to run")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(1)
    args.cache.mkdir(parents=True, exist_ok=True)
    rows = read_rows(args.data)
    wavs = load_wavs(args.data, rows, args.cache)
    fb = Fbank()
    train = [r for r in rows if r["split"] == "train"]
    dev = [r for r in rows if r["split"] == "dev"]
    # per-recording features (train), band-limited copies of the 16 kHz train recordings,
    # and concatenated baby-period features (dev)
    feats = {r["file_id"]: fb(wavs[r["file_id"]]) for r in train}
    feats_bl = {
        r["file_id"]: fb(band_limit(wavs[r["file_id"]])) for r in train if r["codec"].startswith("ios")
    }
    groups: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for r in sorted(dev, key=lambda r: r["chronological_index"]):
        groups[(r["baby_id"], r["period"])].append(r)
    dev_feats = {k: fb(np.concatenate([wavs[r["file_id"]] for r in v])) for k, v in groups.items()}
    dev_codec = {k: v[0]["codec"] for k, v in groups.items()}
    with open(args.data / "dev_pairs.csv", newline="") as fh:
        pairs = list(csv.DictReader(fh))

    embedders: dict[str, object] = {
        "fbank_stats": stats_embed,
        "fbank_stats_lt4k": lambda f: stats_embed(f, 61),
    }
    for c in (256, 1024):
        embedders[f"ecapa_rand_c{c}"] = Ecapa(c)
        embedders[f"ecapa_rand_c{c}_lt4k"] = Ecapa(c, mask_bins=61)
    for th in ((-10.0, 0.0, 10.0), (-5.0, 5.0)):
        embedders[f"ecapa_stats{th}"] = Ecapa(channels=256, emb=160 * len(th), stats_db=(th,))
    # the previous default: level, spectral-shape and modulation thresholds (1280 statistics)
    combo = ((-10.0, 0.0, 10.0), (-10.0, 0.0, 10.0), (-5.0, 5.0))
    embedders["ecapa_stats_combo"] = Ecapa(channels=256, emb=1280, stats_db=combo)
    # global input normalisation (the training split's per-band mean): the long-term spectrum stays
    # visible. A threshold of -100 dB makes a channel linear (the band's value, or its spectral shape).
    g = np.concatenate([feats[r["file_id"]] for r in train]).mean(axis=0)
    embedders["ecapa_stats_combo_global"] = Ecapa(channels=256, emb=1280, stats_db=combo, global_mean=g)
    glob = ((-100.0,), (-100.0, -10.0, 0.0, 10.0), (-5.0, 5.0))  # the shipped default
    embedders["ecapa_stats_global"] = Ecapa(channels=192, emb=1120, stats_db=glob, global_mean=g)
    gain_free = ((), (-100.0, -10.0, 0.0, 10.0), (-5.0, 5.0))  # no absolute level: loudness-invariant
    embedders["ecapa_stats_global_gainfree"] = Ecapa(channels=192, emb=960, stats_db=gain_free, global_mean=g)
    for ck in args.ckpt:
        mask = (
            61
            if (ck / "train_info.json").is_file()
            and json.loads((ck / "train_info.json").read_text()).get("config", {}).get("max_freq_hz")
            else 80
        )
        embedders[f"ckpt:{ck.name}"] = Ecapa(ckpt=ck, mask_bins=mask)
    if args.embeddings:
        embedders = {k: v for k, v in embedders.items() if k in args.embeddings or k.startswith("ckpt:")}

    from cryid.models.training.backend import BackendSettings, fit_backend

    backends = {"none": None}
    for d in (10, 20, 40, 80):
        backends[f"lda{d}"] = BackendSettings(kind="lda", dims=d)
    backends["lda20_plda"] = BackendSettings(kind="lda", dims=20, weighting="plda")
    backends["wccn"] = BackendSettings(kind="wccn")
    results = []
    rng = np.random.default_rng(0)
    babies = sorted({r["baby_id"] for r in train})
    fold_of = {b: i % 5 for i, b in enumerate(rng.permutation(babies))}
    for ename, emb in embedders.items():
        x_tr = np.stack([emb(feats[r["file_id"]]) for r in train])
        y_tr = np.array([r["baby_id"] for r in train])
        x_bl = np.stack([emb(feats_bl[r["file_id"]]) for r in train if r["file_id"] in feats_bl])
        y_bl = np.array([r["baby_id"] for r in train if r["file_id"] in feats_bl])
        x_dev = {k: emb(v) for k, v in dev_feats.items()}
        for bname, bset in backends.items():
            for aug in (False, True):
                if bset is None and aug:
                    continue
                # cross-validation on train
                pos, neg = [], []
                for fold in range(5):
                    tr = np.array([fold_of[b] != fold for b in y_tr])
                    if bset is None:
                        z = x_tr
                    else:
                        xs, ys = x_tr[tr], y_tr[tr]
                        if aug:
                            tb = np.array([fold_of[b] != fold for b in y_bl])
                            xs, ys = np.concatenate([xs, x_bl[tb]]), np.concatenate([ys, y_bl[tb]])
                        z = fit_backend(xs, ys, bset).apply(x_tr)
                    te = np.where(~tr)[0]
                    te_b = y_tr[te]
                    first = {}
                    for i in te:
                        first.setdefault(y_tr[i], i)
                    enr = np.array(list(first.values()))
                    tst = np.array([i for i in te if first[y_tr[i]] != i])
                    s = cos(z[tst], z[enr])
                    lab = y_tr[tst][:, None] == y_tr[enr][None, :]
                    pos.append(s[lab])
                    neg.append(s[~lab])
                    del te_b
                cv = eer(np.concatenate(pos), np.concatenate(neg))
                # dev
                if bset is None:
                    f = lambda v: v  # noqa: E731
                else:
                    xs, ys = (
                        (np.concatenate([x_tr, x_bl]), np.concatenate([y_tr, y_bl])) if aug else (x_tr, y_tr)
                    )
                    be = fit_backend(xs, ys, bset)
                    f = be.apply
                zd = {k: f(v) for k, v in x_dev.items()}
                sc = np.array(
                    [float(cos(zd[(p["baby_id_B"], "B")], zd[(p["baby_id_D"], "D")])) for p in pairs]
                )
                lb = np.array([p["label"] == "1" for p in pairs])
                cm = np.array(
                    [dev_codec[(p["baby_id_B"], "B")] == dev_codec[(p["baby_id_D"], "D")] for p in pairs]
                )
                d_eer = eer(sc[lb], sc[~lb])
                d_cm = eer(sc[lb & cm], sc[~lb & cm])
                bs = sorted(k for k in zd if k[1] == "B")
                ds = sorted(k for k in zd if k[1] == "D")
                sm = cos(np.stack([zd[k] for k in ds]), np.stack([zd[k] for k in bs]))
                top1 = float(np.mean([bs[int(np.argmax(sm[i]))][0] == ds[i][0] for i in range(len(ds))]))
                res = {
                    "embedding": ename,
                    "backend": bname,
                    "bl_aug": aug,
                    "cv_eer": cv,
                    "dev_eer": d_eer,
                    "dev_eer_cm": d_cm,
                    "dev_top1": top1,
                }
                results.append(res)
                print(
                    f"{ename:24s} {bname:11s} aug={aug!s:5s} cv={cv:.3f} dev={d_eer:.3f} "
                    f"cm={d_cm:.3f} top1={top1:.3f}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
