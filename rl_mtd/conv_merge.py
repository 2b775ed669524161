"""Exact composition of consecutive convolutions, and choosing which to compose by cost.

``rl_mtd.export.inference_model`` merges the factor chains of decomposed blocks with these:
:func:`composable` says whether two convs compose exactly into one, :func:`compose` builds it,
and :func:`cheapest_merge` picks, among all the ways to cut a chain into merged runs, the one
with the lowest :func:`conv_cost` (MACs plus memory traffic).
"""

from __future__ import annotations

import torch
from torch import nn

from rl_mtd.errors import RlMtdError

MEMORY_COST = 16.0
"""MAC-equivalents :func:`conv_cost` charges per activation value a conv reads or writes.

Measured on a 2-core AVX-512 CPU at batch 64: convs run at about 200 GMAC/s, while a conv
writing or reading an activation too big for the L2 cache moves 7-10 G values/s, 20-30 MACs'
time per value; smaller activations sit in cache and cost less. The merges made in the VGG
policies tried do not change between 8 and 64.
"""


def cheapest_merge(convs: list[nn.Conv2d]) -> list[nn.Conv2d]:
    """The convs of the cheapest split of a chain into merged runs (by ``conv_cost``).

    Each conv of the result is a merge of consecutive convs of ``convs`` (or one of them,
    unchanged); the chain's output is the same up to rounding.
    """
    # best[j]: (cost, convs) of the cheapest way to compute convs[:j]; chains are short (<= 4).
    best: list[tuple[float, list[nn.Conv2d]]] = [(0.0, [])]
    for j in range(1, len(convs) + 1):
        options = []
        for i in range(j):
            merged = _merge_all(convs[i:j])
            if merged is not None:
                stride = _stride_before(convs, i)
                cost = best[i][0] + conv_cost(merged, stride)
                options.append((cost, i, merged))
        cost, i, merged = min(options, key=lambda o: (o[0], o[1]))
        best.append((cost, [*best[i][1], merged]))
    return best[-1][1]


def _stride_before(convs: list[nn.Conv2d], i: int) -> tuple[int, int]:
    sh = sw = 1
    for c in convs[:i]:
        sh, sw = sh * c.stride[0], sw * c.stride[1]
    return sh, sw


def compose_chain(convs: list[nn.Conv2d]) -> nn.Conv2d:
    """One conv computing the chain ``convs`` exactly (a decomposed block's dense kernel)."""
    merged = _merge_all(list(convs))
    if merged is None:
        raise RlMtdError(f"the chain {list(convs)} is not one conv exactly")
    return merged


def _merge_all(convs: list[nn.Conv2d]) -> nn.Conv2d | None:
    """One conv computing the whole chain ``convs``, or None when that is not exact."""
    merged = convs[0]
    for nxt in convs[1:]:
        if not composable(merged, nxt):
            return None
        merged = compose(merged, nxt)
    return merged


def conv_cost(conv: nn.Conv2d, stride_before: tuple[int, int] = (1, 1)) -> float:
    """Estimated cost of ``conv`` per pixel of its chain's input, in MAC-equivalents.

    MACs plus ``MEMORY_COST`` for every activation value read or written. ``stride_before`` is
    the product of the strides of the chain's convs before this one.
    """
    in_frac = 1.0 / (stride_before[0] * stride_before[1])
    out_frac = in_frac / (conv.stride[0] * conv.stride[1])
    kh, kw = conv.kernel_size
    macs = out_frac * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw
    traffic = in_frac * conv.in_channels + out_frac * conv.out_channels
    return macs + MEMORY_COST * traffic


def _kind(conv: nn.Conv2d) -> str | None:
    """``"dense"``, ``"depthwise"`` (one channel in, one out per group), or None (other)."""
    if conv.groups == 1:
        return "dense"
    if conv.groups == conv.in_channels == conv.out_channels:
        return "depthwise"
    return None


def _pointwise(conv: nn.Conv2d, axis: int) -> bool:
    return conv.kernel_size[axis] == 1 and conv.stride[axis] == 1 and conv.padding[axis] == 0


def composable(first: nn.Conv2d, second: nn.Conv2d) -> bool:
    """Whether ``second(first(x))`` is exactly one conv (see the module docstring)."""
    if _kind(first) is None or _kind(second) is None:
        return False
    if first.out_channels != second.in_channels:
        return False
    if any(isinstance(c.padding, str) or c.padding_mode != "zeros" for c in (first, second)):
        return False
    if not all(_pointwise(first, a) or _pointwise(second, a) for a in (0, 1)):
        return False
    # A bias of ``first`` seen through ``second``'s zero padding is zero at the borders.
    return first.bias is None or not any(second.padding)


@torch.no_grad()
def compose(first: nn.Conv2d, second: nn.Conv2d) -> nn.Conv2d:
    """The conv computing ``second(first(x))``; requires ``composable(first, second)``."""
    if not composable(first, second):
        raise RlMtdError(f"cannot merge {first} and {second} into one conv exactly")
    depthwise = _kind(first) == _kind(second) == "depthwise"
    geometry = [_axis(second if _pointwise(first, a) else first, a) for a in (0, 1)]
    (kh, sh, ph, dh), (kw, sw, pw, dw) = geometry
    w1, w2 = first.weight, second.weight
    if depthwise:
        weight = w2.expand(-1, -1, kh, kw) * w1.expand(-1, -1, kh, kw)
    else:
        d1, d2 = _dense(first), _dense(second)
        weight = torch.einsum(
            "ocxy,cixy->oixy", d2.expand(-1, -1, kh, kw), d1.expand(-1, -1, kh, kw)
        )
    bias = second.bias
    if first.bias is not None:
        through = _dense(second).sum((2, 3)) @ first.bias
        bias = through if bias is None else bias + through
    conv = nn.Conv2d(
        first.in_channels,
        second.out_channels,
        (kh, kw),
        stride=(sh, sw),
        padding=(ph, pw),
        dilation=(dh, dw),
        groups=first.in_channels if depthwise else 1,
        bias=bias is not None,
        device=w1.device,
        dtype=w1.dtype,
    )
    conv.weight.copy_(weight)
    if bias is not None:
        conv.bias.copy_(bias)
    return conv


def _axis(conv: nn.Conv2d, a: int) -> tuple[int, int, int, int]:
    """Kernel size, stride, padding and dilation of ``conv`` along spatial axis ``a``."""
    return conv.kernel_size[a], conv.stride[a], conv.padding[a], conv.dilation[a]


def _dense(conv: nn.Conv2d) -> torch.Tensor:
    """The kernel as a dense ``(out, in, kh, kw)`` tensor (a depthwise kernel on the diagonal)."""
    if conv.groups == 1:
        return conv.weight
    w = conv.weight
    dense = w.new_zeros(conv.out_channels, conv.in_channels, *w.shape[2:])
    idx = torch.arange(conv.out_channels, device=w.device)
    dense[idx, idx] = w[:, 0]
    return dense
