"""Zero-padding the inner channels of factor chains to a runtime's channel block (exact).

ONNX Runtime's CPU convolutions run fastest in a blocked layout (NCHWc: channels in blocks of 8
with AVX2, 16 with AVX-512; its NCHWc graph transform). A conv whose channel counts are not
multiples of the block stays on the plain NCHW path, and every such conv adds a reorder
between layouts. The factor chains of decomposed blocks have ranks like 5, 11 or 43, so a
compressed VGG16 ran mostly off the fast path: padding those ranks to multiples of 8 made its
ONNX Runtime passes 2-2.6x faster at batch 1 and 64 on an AVX2 CPU (BENCHMARKS.md, "Inference
speed"), for a few per cent more MACs. In eager PyTorch (oneDNN) padding was slightly slower,
so ``rl_mtd.export.to_onnx`` pads and ``inference_model`` does not.

The padding is exact: conv ``a``'s extra output channels have zero weights and zero bias, so
they carry zeros, and conv ``b`` reads them with zero weights. Only the channels *inside* a
chain (consecutive convs of one ``nn.Sequential``, such as a ``DecomposedConv``) are padded;
the chain's input and output, which BatchNorm, ReLU, pooling and the classifier see, keep their
sizes.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from torch import nn


def nchwc_block() -> int:
    """ONNX Runtime's NCHWc channel block on this CPU: 16 with AVX-512F, else 8.

    (MLAS's platform setup: 16 where the AVX-512F kernels are chosen, 8 for the AVX/AVX2
    ones.) Read from ``/proc/cpuinfo`` on Linux x86; elsewhere 8, which costs little where the
    block is 16 or the layout unused.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return 8
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 8
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return 16 if "avx512f" in flags.split() else 8


def pad_chains(model: nn.Module, multiple: int) -> nn.Module:
    """Pad, in place, every channel count inside a chain of convs to a multiple of ``multiple``.

    A chain is a run of ``nn.Conv2d`` children with nothing between them in one
    ``nn.Sequential`` (the factor chains of ``rl_mtd.decompose.DecomposedConv``, after
    ``inference_model``'s merging). Plain and depthwise convs are padded; a chain with any
    other grouped conv is left alone. Returns ``model``; its outputs are unchanged.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be at least 1, got {multiple}")
    if multiple == 1:
        return model
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv_a, conv_b = seq._modules[a], seq._modules[b]
            if not (_paddable(conv_a) and _paddable(conv_b)):
                continue
            width = -(-conv_a.out_channels // multiple) * multiple
            if width != conv_a.out_channels:
                seq._modules[a] = _grown(conv_a, out_channels=width)
            if conv_b.in_channels != width:  # b may have been padded already (depthwise a)
                seq._modules[b] = _grown(conv_b, in_channels=width)
    return model


def _depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _paddable(conv: nn.Module) -> bool:
    return isinstance(conv, nn.Conv2d) and (conv.groups == 1 or _depthwise(conv))


@torch.no_grad()
def _grown(
    conv: nn.Conv2d, *, in_channels: int | None = None, out_channels: int | None = None
) -> nn.Conv2d:
    """A copy of ``conv`` with zero channels added (a depthwise conv grows both sides)."""
    c_in = in_channels or conv.in_channels
    c_out = out_channels or conv.out_channels
    if _depthwise(conv):
        c_in = c_out = max(c_in, c_out)
    new = nn.Conv2d(
        c_in,
        c_out,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=c_out if _depthwise(conv) else 1,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    weight = torch.zeros_like(new.weight)
    weight[: conv.out_channels, : conv.weight.shape[1]] = conv.weight
    new.weight.copy_(weight)
    if conv.bias is not None:
        new.bias.zero_()
        new.bias[: conv.out_channels] = conv.bias
    new.weight.requires_grad_(conv.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(conv.weight.requires_grad)
    return new.train(conv.training)
