"""Ranks and parameter counts of decomposed convs: which ranks a method may take
(``normalize_rank``), the rank that meets a per-layer reduction (``rank_for_ratio``) and the
next larger one (``next_rank``), and the parameters a choice leaves (``decomposed_params``,
``params_after``). ``rl_mtd.decompose`` builds the blocks and re-exports all of these.
"""

from __future__ import annotations

import math

from torch import nn

from rl_mtd.errors import RlMtdError

METHODS = ("keep", "tucker2", "cp")
DECOMPOSED = ("tucker2", "cp")
RANK_RULE = 2
"""Version of the rule ``rank_for_ratio`` maps a (method, level) to a rank by; an agent records
it, since its actions mean those ranks (2: Tucker-2 below the out/in proportion on layers with
few input channels, where 1 gave one mild rank at every level)."""

Rank = int | tuple[int, int] | None


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise RlMtdError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def normalize_rank(conv: nn.Conv2d, method: str, rank: Rank) -> Rank:
    """Validate a rank for ``conv`` and return its canonical form (tuple for Tucker-2, int for CP)."""
    _check_method(method)
    o, i = conv.out_channels, conv.in_channels
    if method == "keep":
        return None
    if method == "tucker2":
        if isinstance(rank, int | float) and not isinstance(rank, bool):
            pair = (int(rank), int(rank))
        elif isinstance(rank, list | tuple) and len(rank) == 2:
            pair = (int(rank[0]), int(rank[1]))
        else:
            raise RlMtdError(f"tucker2 rank must be an int or (r_out, r_in), got {rank!r}")
        if not (1 <= pair[0] <= o and 1 <= pair[1] <= i):
            raise RlMtdError(
                f"tucker2 rank {pair} out of range for a conv with {o} outputs and {i} inputs"
            )
        return pair
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise RlMtdError(f"cp rank must be a positive int, got {rank!r}")
    if rank > max_cp_rank(conv):
        dims = "x".join(str(d) for d in conv.weight.shape)
        raise RlMtdError(
            f"cp rank {rank} is more than a {dims} kernel can use: an exact CP decomposition "
            f"never needs more than {max_cp_rank(conv)} terms (use a lower rank, or keep)"
        )
    return int(rank)


def max_cp_rank(conv: nn.Conv2d) -> int:
    """The most terms a CP decomposition of ``conv``'s kernel can need: a tensor's rank is at
    most the product of its dimensions but the largest."""
    dims = (conv.out_channels, conv.in_channels // conv.groups, *conv.kernel_size)
    total = 1
    for d in dims:
        total *= d
    return total // max(dims)


def layer_params(conv: nn.Conv2d) -> int:
    """Parameters of the conv itself (weight and bias)."""
    return conv.weight.numel() + (conv.bias.numel() if conv.bias is not None else 0)


def decomposed_params(conv: nn.Conv2d, method: str, rank: Rank) -> int:
    """Parameters of ``decompose_conv(conv, method, rank)``, computed without building it."""
    rank = normalize_rank(conv, method, rank)
    o, i = conv.out_channels, conv.in_channels
    kh, kw = conv.kernel_size
    bias = o if conv.bias is not None else 0
    if method == "keep":
        return layer_params(conv)
    if method == "tucker2":
        r_out, r_in = rank  # type: ignore[misc]
        return i * r_in + r_in * r_out * kh * kw + r_out * o + bias
    return rank * (i + kh + kw + o) + bias  # type: ignore[operator]


def params_after(
    model_params: int,
    convs: list[tuple[str, nn.Conv2d]],
    choices: list[tuple[str, Rank]],
) -> int:
    """Whole-model parameters once each of ``convs`` becomes its ``(method, rank)`` choice.

    ``model_params`` is the uncompressed model's ``count_params``; BatchNorm and the head are
    unchanged by a decomposition, so only the convs' own parameters move.
    """
    if len(choices) != len(convs):
        raise RlMtdError(f"{len(choices)} choices for a model with {len(convs)} conv layers")
    return model_params + sum(
        decomposed_params(conv, method, rank) - layer_params(conv)
        for (_, conv), (method, rank) in zip(convs, choices)
    )


def _tucker_ranks_for(conv: nn.Conv2d, r_in: int) -> tuple[int, int]:
    """Tucker-2 ranks that keep the layer's out/in channel proportion."""
    o, i = conv.out_channels, conv.in_channels
    return (min(o, max(1, round(r_in * o / i))), r_in)


def next_rank(conv: nn.Conv2d, method: str, rank: Rank) -> Rank | None:
    """The next larger rank of ``method`` for ``conv`` (CP: ``rank + 1``; Tucker-2: one more
    output rank while it is below the layer's proportion - ranks below it exist only where the
    input rank cannot go lower - else one more input rank, the output rank in proportion), or
    None when there is none or it would not have fewer parameters than the layer itself."""
    rank = normalize_rank(conv, method, rank)
    bigger: Rank | None = None
    if method == "cp" and rank < max_cp_rank(conv):  # type: ignore[operator]
        bigger = rank + 1  # type: ignore[operator]
    elif method == "tucker2":
        r_out, r_in = rank  # type: ignore[misc]
        if r_out < _tucker_ranks_for(conv, r_in)[0]:
            bigger = (r_out + 1, r_in)
        elif r_in < conv.in_channels:
            bigger = (max(_tucker_ranks_for(conv, r_in + 1)[0], r_out), r_in + 1)
    if bigger is None or decomposed_params(conv, method, bigger) >= layer_params(conv):
        return None
    return bigger


def rank_for_ratio(conv: nn.Conv2d, method: str, ratio: float) -> Rank:
    """The rank whose decomposition has closest to ``layer_params / ratio`` parameters.

    ``keep`` returns None. Tucker-2 keeps ``r_out / r_in = O / I`` where it can; below the
    smallest such rank (input rank 1: a layer with few input channels, such as the first) the
    output rank goes down alone, so every level is met there too. Both methods are compared at
    one parameter budget this way.
    """
    _check_method(method)
    if method == "keep":
        return None
    if not ratio > 0 or not math.isfinite(ratio):
        raise RlMtdError(f"ratio must be a positive number, got {ratio!r}")
    budget = layer_params(conv) / ratio
    if method == "cp":
        # Params are linear in the rank: solve, then check the two neighbours.
        per = sum((conv.in_channels, *conv.kernel_size, conv.out_channels))
        bias = conv.out_channels if conv.bias is not None else 0
        r = min(max(1, int((budget - bias) // per)), max_cp_rank(conv))
        candidates: list[Rank] = [r, min(r + 1, max_cp_rank(conv))]
    else:
        candidates = [_tucker_ranks_for(conv, r) for r in range(1, conv.in_channels + 1)]
        candidates += [(r_out, 1) for r_out in range(1, candidates[0][0])]
    return min(candidates, key=lambda rk: abs(decomposed_params(conv, method, rk) - budget))
