"""Zero-padding the inner channels of factor chains to a runtime's channel block (exact).

ONNX Runtime's CPU convolutions run fastest in a blocked layout (NCHWc: channels in blocks of 8
with AVX2, 16 with AVX-512; its NCHWc graph transform). A conv whose channel counts are not
multiples of the block stays on the plain NCHW path, and every such conv adds a reorder
between layouts. The factor chains of decomposed blocks have ranks like 5, 11 or 43, so a
compressed VGG16 ran mostly off the fast path: padding those ranks to multiples of 8 made the
ONNX Runtime passes of uniform Tucker-2 and CP 37x VGG16s 1.6-1.9x faster at batch 1 and 64 on
an AVX2 CPU (a mixed policy's, whose kept layers were aligned already, level; BENCHMARKS.md,
"ONNX Runtime's blocked kernels want aligned channels"), for a few per cent more MACs. In
eager PyTorch (oneDNN) padding was slightly slower, so ``rl_mtd.export.to_onnx`` pads and
``inference_model`` does not by default.

The padding is exact: a conv's extra output channels have zero weights and zero bias, so they
carry zeros (whatever the conv's padding mode), and the next conv reads them with zero weights.
Only the channels *inside* a chain (consecutive convs of one ``nn.Sequential``, such as a
``DecomposedConv``) are padded; the chain's input and output, which BatchNorm, ReLU, pooling and
the classifier see, keep their sizes.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize, skip_init

from rl_mtd.decompose import DecomposedConv


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
    """Pad, in place, the channel counts inside chains of convs to multiples of ``multiple``.

    A chain is a run of plain ``nn.Conv2d`` children with nothing between them in one
    ``nn.Sequential`` (the factor chains of ``rl_mtd.decompose.DecomposedConv``, after
    ``inference_model``'s merging). A channel count inside a chain is padded unless that would
    change the chain's input or output size: a depthwise conv keeps its two sides equal, so
    its two counts are padded together or not at all, and a conv that cannot be padded (other
    grouped convs, subclasses of ``nn.Conv2d``, convs with hooks or parametrizations) keeps its
    sizes, as the chain's ends do. Returns ``model``; its outputs are unchanged.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be at least 1, got {multiple}")
    if multiple == 1:
        return model
    for seq in [m for m in model.modules() if type(m) in (nn.Sequential, DecomposedConv)]:
        for run in _conv_runs(seq):
            _pad_run(seq, run, multiple)
    return model


def _conv_runs(seq: nn.Sequential) -> list[list[str]]:
    """Names of each run of two or more consecutive ``nn.Conv2d`` children of ``seq``."""
    runs: list[list[str]] = [[]]
    for name, child in seq.named_children():
        if isinstance(child, nn.Conv2d):
            runs[-1].append(name)
        elif runs[-1]:
            runs.append([])
    return [run for run in runs if len(run) > 1]


def _pad_run(seq: nn.Sequential, run: list[str], multiple: int) -> None:
    """Pad the channel slots between the convs of ``run`` (slot i feeds conv i) that can be."""
    convs = [seq._modules[name] for name in run]
    n = len(convs)
    slots = [convs[0].in_channels] + [c.out_channels for c in convs]
    # A depthwise conv ties its two slots into one group; groups are runs of neighbouring slots.
    group = [0]
    for conv in convs:
        group.append(group[-1] if _plain(conv) and _depthwise(conv) else group[-1] + 1)
    pinned = {group[0], group[n]}  # the chain's input and output
    pinned.update(group[j] for i, c in enumerate(convs) if not _plain(c) for j in (i, i + 1))
    widths = [
        c if group[i] in pinned else -(-c // multiple) * multiple for i, c in enumerate(slots)
    ]
    for i, (name, conv) in enumerate(zip(run, convs)):
        if (widths[i], widths[i + 1]) != (conv.in_channels, conv.out_channels):
            setattr(seq, name, _grown(conv, widths[i], widths[i + 1]))


def _depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _plain(conv: nn.Module) -> bool:
    """An exact ``nn.Conv2d`` (no subclass, hooks or parametrizations), plain or depthwise."""
    if type(conv) is not nn.Conv2d or parametrize.is_parametrized(conv):
        return False
    if conv._forward_hooks or conv._forward_pre_hooks:
        return False
    return conv.groups == 1 or _depthwise(conv)


@torch.no_grad()
def _grown(conv: nn.Conv2d, c_in: int, c_out: int) -> nn.Conv2d:
    """A copy of ``conv`` with zero channels added; torch's random state is left alone."""
    new = skip_init(
        nn.Conv2d,
        c_in,
        c_out,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=c_out if _depthwise(conv) else 1,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    weight = torch.zeros_like(new.weight)
    weight[: conv.out_channels, : conv.weight.shape[1]] = conv.weight
    if not conv.weight.is_contiguous():  # keep a channels_last layout
        weight = weight.contiguous(memory_format=torch.channels_last)
    new.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        bias = torch.zeros_like(new.bias)
        bias[: conv.out_channels] = conv.bias
        new.bias = nn.Parameter(bias, requires_grad=conv.bias.requires_grad)
    return new.train(conv.training)
