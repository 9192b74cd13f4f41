"""Rewrites of ECAPA's ``Conv1d`` layers that run faster in onnxruntime, and int8 quantisation (torch lazily).

fp32: a ``Conv1d`` exported as a ``Conv`` with a (1, k) kernel over (B, C, 1, T) gets onnxruntime's
blocked NCHWc convolution kernels (about 15% faster here than the 1-D ``Conv``), same numbers.

int8: onnxruntime's dynamically quantised ``Conv`` (``ConvInteger``) is slower than fp32 on CPU,
while a dynamically quantised ``MatMul`` runs on its fast int8 GEMM. A stride-1, ungrouped
``Conv1d`` with kernel k and dilation d equals one MatMul over k shifted copies of its input
(im2col), so the int8 model is exported from a copy of the ECAPA whose ``Conv1d`` layers are
rewritten that way (identical results in fp32), then ``quantize_dynamic`` (QInt8 weights) is applied.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SCHEME = "onnxruntime quantize_dynamic, QInt8 weights (7-bit range) per tensor, convolutions as MatMul"


def _matmul_conv_class() -> Any:
    import torch

    class MatMulConv1d(torch.nn.Module):
        """``Conv1d`` (stride 1, no groups, no padding) as im2col + MatMul; input/output (B, C, T)."""

        def __init__(self, conv: torch.nn.Conv1d) -> None:
            super().__init__()
            self.k = int(conv.kernel_size[0])
            self.d = int(conv.dilation[0])
            w = conv.weight.detach()  # (C_out, C_in, k)
            cout, cin = int(w.shape[0]), int(w.shape[1])
            self.register_buffer("w", w.permute(2, 1, 0).reshape(self.k * cin, cout).contiguous())
            bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(cout)
            self.register_buffer("b", bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            k, d = self.k, self.d
            if k == 1:
                cols = x
            else:
                parts = []
                for i in range(k):
                    end = (k - 1 - i) * d
                    parts.append(x[:, :, i * d : -end] if end else x[:, :, i * d :])
                cols = torch.cat(parts, dim=1)
            return (torch.matmul(cols.transpose(1, 2), self.w) + self.b).transpose(1, 2)

    return MatMulConv1d


def _conv2d_class() -> Any:
    import torch

    class Conv1dAs2d(torch.nn.Module):
        """``Conv1d`` as a ``Conv2d`` with a (1, k) kernel; input/output (B, C, T)."""

        def __init__(self, conv: torch.nn.Conv1d) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                (1, int(conv.kernel_size[0])),
                dilation=(1, int(conv.dilation[0])),
                bias=conv.bias is not None,
            )
            with torch.no_grad():
                self.conv.weight.copy_(conv.weight.detach().unsqueeze(2))
                if conv.bias is not None:
                    self.conv.bias.copy_(conv.bias.detach())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x.unsqueeze(2)).squeeze(2)

    return Conv1dAs2d


def _fast_pooling_class() -> Any:
    import torch

    class GlobalContextPooling(torch.nn.Module):
        """speechbrain's ``AttentiveStatisticsPooling`` (global context) for unpadded clips.

        The attention TDNN sees ``[x, mean, std]`` with mean and std repeated over time; its 1x1
        conv splits into ``W_x @ x`` plus a per-clip term ``W_ms @ [mean, std]``, so nothing is tiled.
        """

        def __init__(self, asp: Any) -> None:
            super().__init__()
            conv = asp.tdnn.conv.conv
            channels = conv.in_channels // 3
            self.eps = asp.eps
            self.conv_x = torch.nn.Conv1d(channels, conv.out_channels, 1)
            self.ms = torch.nn.Linear(2 * channels, conv.out_channels, bias=False)
            with torch.no_grad():
                self.conv_x.weight.copy_(conv.weight[:, :channels])
                self.conv_x.bias.copy_(conv.bias)
                self.ms.weight.copy_(conv.weight[:, channels:, 0])
            self.activation, self.norm = asp.tdnn.activation, asp.tdnn.norm
            self.tanh, self.conv = asp.tanh, asp.conv

        def _stats(self, x: torch.Tensor, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            mean = x.mean(dim=2) if w is None else (w * x).sum(dim=2)
            dev = (x - mean.unsqueeze(2)).pow(2)
            var = dev.mean(dim=2) if w is None else (w * dev).sum(dim=2)
            return mean, torch.sqrt(var.clamp(self.eps))

        def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
            mean, std = self._stats(x, None)
            ctx = self.ms(torch.cat([mean, std], dim=1)).unsqueeze(2)
            attn = self.conv(self.tanh(self.norm(self.activation(self.conv_x(x) + ctx))))
            mean, std = self._stats(x, torch.softmax(attn, dim=2))
            return torch.cat([mean, std], dim=1).unsqueeze(2)

    return GlobalContextPooling


def _rewritable(model: Any) -> bool:
    import torch

    for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv1d)):
        if conv.stride[0] != 1 or conv.groups != 1 or conv.padding != (0,):
            logger.warning("conv %s cannot be rewritten; the graph keeps it as a 1-D Conv", conv)
            return False
    return True


def _swapped(model: Any, cls: Any) -> Any:
    import torch

    rewritten = copy.deepcopy(model).eval()
    asp = getattr(rewritten, "asp", None)
    if asp is not None and getattr(asp, "global_context", False) and hasattr(asp, "tdnn"):
        rewritten.asp = _fast_pooling_class()(asp).eval()

    def swap(module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, torch.nn.Conv1d):
                setattr(module, name, cls(child))
            else:
                swap(child)

    swap(rewritten)
    return rewritten


def convs_as_conv2d(model: Any) -> Any:
    """A copy of ``model`` with every ``Conv1d`` as a (1, k) ``Conv2d``; ``model`` if not rewritable."""
    return _swapped(model, _conv2d_class()) if _rewritable(model) else model


def convs_as_matmul(model: Any) -> Any | None:
    """A copy of ``model`` with every ``Conv1d`` as a MatMul; None if some conv cannot be rewritten."""
    return _swapped(model, _matmul_conv_class()) if _rewritable(model) else None


def quantize_int8(fp32: Path, out: Path) -> None:
    """onnxruntime dynamic quantisation of ``fp32`` into ``out`` (QInt8 weights, 7-bit range, per tensor)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantiser logs shape-inference chatter on the root logger; keep the CLI's output clean.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        # reduce_range: 7-bit weights. On x86 CPUs without VNNI (AVX2 only, e.g. this AMD EPYC) onnxruntime's
        # u8s8 kernels use VPMADDUBSW, whose 16-bit sums saturate with full-range weights: the random-weight
        # test model fell to min cosine 0.985 to fp32 there, against 0.9999 with 7-bit weights.
        quantize_dynamic(
            str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=False, reduce_range=True
        )
    finally:
        root.setLevel(level)
