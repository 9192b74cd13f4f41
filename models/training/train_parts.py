"""Pieces of ``cryid model train``: speechbrain layout, features, embedding, dev validation, augmentation.

torch and speechbrain are imported inside the functions (the ``train`` extra).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np

from cryid.models.audio import SAMPLE_RATE, load_audio
from cryid.models.errors import CryidError
from cryid.models.files import atomic_write

N_MELS = 80


class TrainError(CryidError):
    """Training cannot start or continue (bad data, mismatching resume state, unknown device)."""


def kept_mel_bins(max_freq_hz: float | None, n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE) -> int:
    """How many of speechbrain's mel bands lie wholly at or below ``max_freq_hz``."""
    if max_freq_hz is None:
        return n_mels
    mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    points = np.linspace(0.0, mel(sample_rate / 2), n_mels + 2)
    hz = 700.0 * (10 ** (points / 2595.0) - 1.0)
    return int(np.sum(hz[2:] <= max_freq_hz + 1e-6))


HYPERPARAMS_TEMPLATE = """\
# ############################################################################
# Model: ECAPA-TDNN for infant cry verification, trained by `cryid model train`
# ############################################################################

n_mels: 80
pretrained_path: {pretrained_path}
out_n_neurons: {n_classes}

compute_features: !new:speechbrain.lobes.features.Fbank
    n_mels: !ref <n_mels>

mean_var_norm: !new:speechbrain.processing.features.InputNormalization
    norm_type: {input_norm}
    std_norm: False

embedding_model: !new:speechbrain.lobes.models.ECAPA_TDNN.ECAPA_TDNN
    input_size: !ref <n_mels>
    channels: [{c}, {c}, {c}, {c}, {c3}]
    kernel_sizes: [5, 3, 3, 3, 1]
    dilations: [1, 2, 3, 4, 1]
    attention_channels: 128
    lin_neurons: {emb}

classifier: !new:speechbrain.lobes.models.ECAPA_TDNN.Classifier
    input_size: {emb}
    out_neurons: !ref <out_n_neurons>

mean_var_norm_emb: !new:speechbrain.processing.features.InputNormalization
    norm_type: global
    std_norm: False

modules:
    compute_features: !ref <compute_features>
    mean_var_norm: !ref <mean_var_norm>
    embedding_model: !ref <embedding_model>
    mean_var_norm_emb: !ref <mean_var_norm_emb>
    classifier: !ref <classifier>

label_encoder: !new:speechbrain.dataio.encoder.CategoricalEncoder

pretrainer: !new:speechbrain.utils.parameter_transfer.Pretrainer
    loadables:{norm_loadable}
        embedding_model: !ref <embedding_model>
        mean_var_norm_emb: !ref <mean_var_norm_emb>
        classifier: !ref <classifier>
        label_encoder: !ref <label_encoder>
    paths:{norm_path}
        embedding_model: !ref <pretrained_path>/embedding_model.ckpt
        mean_var_norm_emb: !ref <pretrained_path>/mean_var_norm_emb.ckpt
        classifier: !ref <pretrained_path>/classifier.ckpt
        label_encoder: !ref <pretrained_path>/label_encoder.txt
"""


# With norm_type global the input normalisation's per-band mean is a checkpoint of its own.
GLOBAL_NORM_LOADABLE = "\n        mean_var_norm: !ref <mean_var_norm>"
GLOBAL_NORM_PATH = "\n        mean_var_norm: !ref <pretrained_path>/mean_var_norm.ckpt"


def set_global_input_norm(hp: dict[str, Any], wavs: list[np.ndarray]) -> None:
    """Fix a global ``mean_var_norm`` to the per-band mean of Fbank over every frame of ``wavs``.

    Computed once before training and frozen (eval mode), so every epoch and the exported front end
    subtract the same vector; the standard deviation is not used (``std_norm: False``).
    """
    import torch

    norm = hp["mean_var_norm"]
    total, frames = None, 0
    with torch.no_grad():
        for wav in wavs:
            f = hp["compute_features"](torch.from_numpy(wav)[None])[0].double()
            total = f.sum(0) if total is None else total + f.sum(0)
            frames += f.shape[0]
    if total is None:
        raise TrainError("global input normalisation needs training audio")
    norm.glob_mean = (total / frames).float()
    norm.glob_std = torch.ones_like(norm.glob_mean)
    norm.count = frames
    norm.eval()


def embed_waves(hp: dict[str, Any], wavs: list[np.ndarray], device: str, keep_bins: int) -> np.ndarray:
    """One embedding per whole waveform (eval mode, no gradient), as ``encode_batch(normalize=False)``."""
    import torch

    model = hp["embedding_model"]
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for wav in wavs:
            x = torch.from_numpy(wav)[None].to(device)
            feats = features(hp, x, torch.ones(1, device=device), keep_bins)
            out.append(model(feats)[0, 0].float().cpu().numpy())
    model.train(was_training)
    return np.stack(out)


def features(hp: dict[str, Any], wavs: Any, lens: Any, keep_bins: int) -> Any:
    feats = hp["compute_features"](wavs)
    feats = hp["mean_var_norm"](feats, lens)
    if keep_bins < N_MELS:
        feats = feats.clone()
        feats[:, :, keep_bins:] = 0.0
    return feats


def validate(hp: dict[str, Any], ds: Any, split: str, device: str, keep_bins: int) -> dict[str, float]:
    """CryCeleb protocol on ``split``: EER of all pairs, of channel-matched pairs, top-1 of D among B."""
    from cryid.models.evaluation.metrics import eer, identification_rates

    groups = ds.groups(split)
    pairs = [p for p in ds.read_pairs(split) if p.label is not None]
    if not pairs:
        raise TrainError(f"{split}_pairs.csv has no labels; validation needs labelled pairs (or --no-val)")
    keys = sorted(groups)
    embs = embed_waves(
        hp, [np.concatenate([load_audio(r.path) for r in groups[k]]) for k in keys], device, keep_bins
    )
    embs = embs / np.linalg.norm(embs, axis=1, keepdims=True)
    index = {k: i for i, k in enumerate(keys)}
    scores = np.array([embs[index[(p.baby_id_b, "B")]] @ embs[index[(p.baby_id_d, "D")]] for p in pairs])
    labels = np.array([p.label == 1 for p in pairs])
    metrics = {"eer": eer(scores[labels], scores[~labels])[0]}
    chan = {k: ds.channel_of(groups[k]) for k in keys}
    matched = np.array(
        [
            chan[(p.baby_id_b, "B")] is not None and chan[(p.baby_id_b, "B")] == chan[(p.baby_id_d, "D")]
            for p in pairs
        ]
    )
    if (labels & matched).any() and (~labels & matched).any():
        metrics["eer_channel_matched"] = eer(scores[labels & matched], scores[~labels & matched])[0]
    b_keys = [k for k in keys if k[1] == "B"]
    d_keys = [k for k in keys if k[1] == "D" and (k[0], "B") in index]
    if d_keys:
        sm = embs[[index[k] for k in d_keys]] @ embs[[index[k] for k in b_keys]].T
        truth = np.array([b_keys.index((k[0], "B")) for k in d_keys])
        metrics["top1"] = identification_rates(sm, truth).top1
    return metrics


class Augmenter:
    """Channel augmentation of a (B, T) batch of 16 kHz chunks: speed, 8 kHz band-limit, noise, gain."""

    def __init__(self, settings: Any, seed: int) -> None:  # a TrainSettings
        self.s = settings
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch: Any) -> Any:
        import torch
        import torchaudio.functional as taf

        s, out = self.s, []
        n = batch.shape[1]
        for wav in batch:
            if self.rng.random() < s.speed_p:
                factor = float(self.rng.choice(s.speeds))
                wav = taf.resample(wav, round(SAMPLE_RATE * factor), SAMPLE_RATE)
                wav = wav[:n] if wav.shape[0] >= n else torch.nn.functional.pad(wav, (0, n - wav.shape[0]))
            if self.rng.random() < s.bandlimit_p:
                wav = taf.resample(taf.resample(wav, SAMPLE_RATE, 8000), 8000, SAMPLE_RATE)[:n]
                wav = torch.nn.functional.pad(wav, (0, n - wav.shape[0]))
            if self.rng.random() < s.noise_p:
                white = torch.from_numpy(self.rng.standard_normal(n).astype(np.float32)).to(wav.device)
                alpha = float(self.rng.uniform(0.0, 2.0))  # 0 white, 1 pink, 2 brown
                spec = torch.fft.rfft(white)
                f = torch.arange(spec.shape[0], device=wav.device).clamp(min=1).float()
                noise = torch.fft.irfft(spec / f ** (alpha / 2), n=n)
                snr = float(self.rng.uniform(*s.noise_snr_db))
                p_sig = wav.pow(2).mean().clamp(min=1e-10)
                noise = noise * torch.sqrt(p_sig / (noise.pow(2).mean().clamp(min=1e-12) * 10 ** (snr / 10)))
                wav = wav + noise
            if self.rng.random() < s.gain_p:
                wav = wav * 10 ** (float(self.rng.uniform(*s.gain_db)) / 20)
            out.append(wav)
        return torch.stack(out)


def chunk(wav: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    if len(wav) < length:  # short baby-period: repeat it to the chunk length
        wav = np.tile(wav, math.ceil(length / max(len(wav), 1)))
    start = int(rng.integers(0, len(wav) - length + 1))
    return wav[start : start + length]


def save_speechbrain_dir(
    hp: dict[str, Any], text: str, labels: list[str], out: Path, train_embs: np.ndarray
) -> None:
    """Write the speechbrain layout (atomically per file) for the current weights."""
    import torch

    def put(name: str, writer: Any) -> None:
        atomic_write(out / name, writer)

    put("embedding_model.ckpt", lambda p: torch.save(hp["embedding_model"].state_dict(), p))
    if hp["mean_var_norm"].norm_type == "global":
        put("mean_var_norm.ckpt", hp["mean_var_norm"]._save)
    put("classifier.ckpt", lambda p: torch.save(hp["classifier"].state_dict(), p))
    norm = hp["mean_var_norm_emb"]
    norm.glob_mean = torch.from_numpy(train_embs.mean(axis=0)).float()
    norm.glob_std = torch.ones(train_embs.shape[1])
    norm.count = len(train_embs)
    put("mean_var_norm_emb.ckpt", norm._save)
    enc = hp["label_encoder"]
    enc.lab2ind, enc.ind2lab = {}, {}
    enc.update_from_iterable(labels)
    put("label_encoder.txt", enc.save)
    put("hyperparams.yaml", lambda p: p.write_text(text, encoding="utf-8"))


def rng_state() -> dict[str, Any]:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


LEVEL_OFFSET_DB = 100.0  # mean-normalised log-mel clipped at top_db=80 never goes below -80 dB
DELTA_OFFSET_DB = 200.0  # a first difference of such features never goes below -160 dB


def stats_init(
    model: Any,
    level_db: tuple[float, ...],
    framegain_db: tuple[float, ...] = (),
    delta_db: tuple[float, ...] = (),
    n_mels: int = N_MELS,
) -> int:
    """Set an ECAPA-TDNN's weights so that it computes statistics of the normalised log-mel x.

    Block 0 carries x (channels 0..n-1, shifted by +100 dB so the ReLU keeps it linear) and its first
    difference over time d(t) = x(t+1) - x(t-1) (channels n..2n-1, +200 dB); the SE-Res2Net blocks
    pass their input through their residual path (the last BatchNorm of each block is zeroed); the
    aggregation layer (1x1 conv + ReLU) builds one channel per band b and threshold t:
    ``relu(x_b - t)`` (level), ``relu(x_b - mean_over_bands(x) - t)`` (spectral shape, loudness
    removed per frame) and ``relu(d_b - t)`` (modulation); attention is uniform, so the pooling returns
    each channel's mean and standard deviation over time, and ``fc`` emits them as the embedding.
    A threshold of -100 dB (``-LEVEL_OFFSET_DB``) makes a channel linear wherever its input stays
    above -100 dB (always, after sentence normalisation): the band's value itself, or its spectral
    shape. With global input normalisation the means of such channels are the recording's long-term
    spectrum and its shape.
    A linear back-end (LDA) on top makes it a discriminant of cry statistics; AAM training may start
    from here. The network stays an unmodified speechbrain ECAPA_TDNN. Returns the embedding size.
    """
    import torch

    specs = [("level", t) for t in level_db] + [("framegain", t) for t in framegain_db]
    specs += [("delta", t) for t in delta_db]
    n_stats = n_mels * len(specs)
    c = model.blocks[0].conv.conv.out_channels
    mfa_out = model.mfa.conv.conv.out_channels
    emb = model.fc.conv.out_channels
    if not specs or c < 2 * n_mels or mfa_out < n_stats or emb != 2 * n_stats:
        raise TrainError(
            f"stats initialisation of {len(specs)} thresholds x {n_mels} bands needs "
            f"channels >= {2 * n_mels}, "
            f"3 x channels >= {n_stats} and embedding_dim == {2 * n_stats}; got channels {c}, "
            f"embedding_dim {emb}"
        )

    def identity_bn(bn: Any, scale: float = 1.0) -> None:
        bn.norm.running_mean.zero_()
        bn.norm.running_var.fill_(1.0)
        bn.norm.weight.fill_(scale)
        bn.norm.bias.zero_()

    with torch.no_grad():
        first = model.blocks[0].conv.conv
        first.weight.zero_()
        first.bias.zero_()
        centre = first.weight.shape[2] // 2
        for b in range(n_mels):
            first.weight[b, b, centre] = 1.0
            first.bias[b] = LEVEL_OFFSET_DB
            first.weight[n_mels + b, b, centre + 1] = 1.0
            first.weight[n_mels + b, b, centre - 1] = -1.0
            first.bias[n_mels + b] = DELTA_OFFSET_DB
        identity_bn(model.blocks[0].norm)
        for block in model.blocks[1:]:
            identity_bn(block.tdnn2.norm, scale=0.0)  # block output = its residual input
        mfa = model.mfa.conv.conv
        mfa.weight.zero_()
        mfa.bias.zero_()
        off = mfa.weight.shape[1] - c  # the last block's copy in the concatenation
        for k, (kind, t) in enumerate(specs):
            for b in range(n_mels):
                j = k * n_mels + b
                if kind == "level":
                    mfa.weight[j, off + b, 0] = 1.0
                    mfa.bias[j] = -LEVEL_OFFSET_DB - t
                elif kind == "framegain":
                    mfa.weight[j, off : off + n_mels, 0] = -1.0 / n_mels
                    mfa.weight[j, off + b, 0] += 1.0
                    mfa.bias[j] = -t
                else:
                    mfa.weight[j, off + n_mels + b, 0] = 1.0
                    mfa.bias[j] = -DELTA_OFFSET_DB - t
        identity_bn(model.mfa.norm)
        model.asp.conv.conv.weight.zero_()  # uniform attention
        model.asp.conv.conv.bias.zero_()
        identity_bn(model.asp_bn)
        fc = model.fc.conv  # input: [means of the mfa channels, their standard deviations]
        fc.weight.zero_()
        fc.bias.zero_()
        pooled = fc.weight.shape[1] // 2
        for i in range(n_stats):
            fc.weight[i, i, 0] = 1.0
            fc.weight[n_stats + i, pooled + i, 0] = 1.0
    return n_stats * 2
