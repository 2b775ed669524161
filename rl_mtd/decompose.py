"""Conv layers as decomposed blocks: Tucker-2 and CP, their parameter counts, and a factor cache.

- ``tucker2`` (Kim et al. 2016): 1x1 conv ``I -> r_in`` (``U_in^T``), kxk core conv
  ``r_in -> r_out`` (``G``, the original stride/padding/dilation), 1x1 conv ``r_out -> O``
  (``U_out``, the original bias).
- ``cp`` (Lebedev et al. 2015): 1x1 conv ``I -> R`` (``B^T``), depthwise ``kh x 1`` (``C``),
  depthwise ``1 x kw`` (``D``), 1x1 conv ``R -> O`` (``A``, the original bias).

Factors are cached by (hash of the kernel bytes, method, rank) in memory and on disk
(``rl_mtd.factor_cache``, whose names are importable from here too), so a layer is decomposed
once across episodes, processes and runs.

Given the layer's input activations (or their channel moment, ``input_moment``), the factors
minimise the layer's output error on such inputs instead of the kernel error (``rl_mtd.datafit``;
``collect_input_moments`` and ``input_moment`` are importable from here too); the cache key then
includes a hash of the moment.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from rl_mtd import datafit, factorize
from rl_mtd.datafit import collect_input_moments as collect_input_moments  # re-exported
from rl_mtd.datafit import input_moment as input_moment  # re-exported
from rl_mtd.errors import RlMtdError
from rl_mtd.factor_cache import FACTOR_VERSION as FACTOR_VERSION  # re-exported
from rl_mtd.factor_cache import FactorCache, default_cache, moment_key, weight_key

log = logging.getLogger(__name__)

METHODS = ("keep", "tucker2", "cp")
DECOMPOSED = ("tucker2", "cp")
RANK_RULE = 2
"""Version of the rule ``rank_for_ratio`` maps a (method, level) to a rank by; an agent records
it, since its actions mean those ranks (2: Tucker-2 below the out/in proportion on layers with
few input channels, where 1 gave one mild rank at every level)."""

Rank = int | tuple[int, int] | None


class DecomposedConv(nn.Sequential):
    """A conv replaced by a chain of smaller convs; keeps what it replaced for printing."""

    def __init__(self, method: str, rank: Rank, source_shape: tuple[int, ...], *layers: nn.Module):
        super().__init__(*layers)
        self.method = method
        self.rank = rank
        self.source_shape = tuple(source_shape)

    def extra_repr(self) -> str:
        return f"method={self.method}, rank={self.rank}, replaces={self.source_shape}"


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The model's original conv layers in forward (registration) order.

    Convs inside a ``DecomposedConv`` are parts of a decomposition, not layers of their own.
    """
    inner: set[int] = set()
    found = []
    for name, module in model.named_modules():
        if isinstance(module, DecomposedConv):
            inner.update(id(m) for m in module.modules())
        elif isinstance(module, nn.Conv2d) and id(module) not in inner:
            found.append((name, module))
    return found


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise RlMtdError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def _check_conv(conv: nn.Conv2d) -> None:
    if conv.groups != 1:
        raise RlMtdError(f"cannot decompose a grouped conv (groups={conv.groups})")


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


# ----------------------------------------------------------------------------- factors


def compute_factors(
    weight: torch.Tensor, method: str, rank: Rank, *, input_moment: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Factor tensors for one kernel, uncached; data-aware with ``input_moment``."""
    if not torch.isfinite(weight).all():
        raise RlMtdError(
            "the conv kernel holds NaN or inf weights; the checkpoint is damaged or training "
            "diverged - retrain or pass another --checkpoint"
        )
    if input_moment is not None:
        i = weight.shape[1]
        if tuple(input_moment.shape) != (i, i):
            raise RlMtdError(
                f"the input moment has shape {tuple(input_moment.shape)}, but the conv has {i} "
                f"input channels: expected ({i}, {i}) - were the moments collected on this model?"
            )
        if not torch.isfinite(input_moment).all():
            raise RlMtdError("the input moment holds NaN or inf values; the activations diverged")
    if method == "tucker2":
        t = factorize.tucker2(weight, rank, input_moment=input_moment)  # type: ignore[arg-type]
        return {"core": t.core, "u_out": t.u_out, "u_in": t.u_in}
    f = factorize.cp(weight, rank, input_moment=input_moment)  # type: ignore[arg-type]
    return {"out": f.out, "inp": f.inp, "vertical": f.vertical, "horizontal": f.horizontal}


def get_factors(
    conv: nn.Conv2d,
    method: str,
    rank: Rank,
    *,
    cache: FactorCache | None = None,
    wkey: str | None = None,
    input_moment: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Factors of ``conv`` for ``method`` at ``rank``, from the cache when it has them.

    With ``input_moment`` the fit is data-aware and cached under a key that includes its hash.
    """
    cache = cache if cache is not None else default_cache()
    mkey = moment_key(input_moment) if input_moment is not None else None
    key = FactorCache.key(wkey or weight_key(conv.weight), method, rank, mkey)
    found = cache.get(key, expect=factor_shapes(conv, method, rank))
    if found is None:
        found = compute_factors(conv.weight.detach(), method, rank, input_moment=input_moment)
        cache.put(key, found)
    return found


def factor_shapes(conv: nn.Conv2d, method: str, rank: Rank) -> dict[str, tuple[int, ...]]:
    """The shape of every factor tensor ``compute_factors`` returns for ``conv``."""
    rank = normalize_rank(conv, method, rank)
    o, i = conv.out_channels, conv.in_channels
    kh, kw = conv.kernel_size
    if method == "tucker2":
        r_out, r_in = rank  # type: ignore[misc]
        return {"core": (r_out, r_in, kh, kw), "u_out": (o, r_out), "u_in": (i, r_in)}
    if method == "cp":
        return {
            "out": (o, rank),
            "inp": (i, rank),
            "vertical": (kh, rank),
            "horizontal": (kw, rank),
        }
    raise RlMtdError(f"method {method!r} has no factors")


# ----------------------------------------------------------------------------- building layers


def _conv(cin: int, cout: int, kernel: tuple[int, int], **kw) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, **kw)


def build_decomposed(conv: nn.Conv2d, method: str, rank: Rank) -> nn.Module:
    """The decomposed block's structure with untrained weights (for loading a state_dict)."""
    _check_conv(conv)
    rank = normalize_rank(conv, method, rank)
    o, i = conv.out_channels, conv.in_channels
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    ph, pw = _padding(conv)
    dh, dw = conv.dilation
    bias = conv.bias is not None
    common = {"padding_mode": conv.padding_mode}
    if method == "keep":
        clone = nn.Conv2d(
            i,
            o,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=bias,
            padding_mode=conv.padding_mode,
        )
        return clone.to(device=conv.weight.device, dtype=conv.weight.dtype)
    if method == "tucker2":
        r_out, r_in = rank  # type: ignore[misc]
        layers = [
            _conv(i, r_in, (1, 1), bias=False),
            _conv(
                r_in,
                r_out,
                (kh, kw),
                stride=(sh, sw),
                padding=(ph, pw),
                dilation=(dh, dw),
                bias=False,
                **common,
            ),
            _conv(r_out, o, (1, 1), bias=bias),
        ]
    else:
        r = int(rank)  # type: ignore[arg-type]
        layers = [
            _conv(i, r, (1, 1), bias=False),
            _conv(
                r,
                r,
                (kh, 1),
                stride=(sh, 1),
                padding=(ph, 0),
                dilation=(dh, 1),
                groups=r,
                bias=False,
                **common,
            ),
            _conv(
                r,
                r,
                (1, kw),
                stride=(1, sw),
                padding=(0, pw),
                dilation=(1, dw),
                groups=r,
                bias=False,
                **common,
            ),
            _conv(r, o, (1, 1), bias=bias),
        ]
    block = DecomposedConv(method, rank, tuple(conv.weight.shape), *layers)
    return block.to(device=conv.weight.device, dtype=conv.weight.dtype)


def _padding(conv: nn.Conv2d) -> tuple[int, int]:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        raise RlMtdError("padding='same' convs are not supported; use explicit integer padding")
    return conv.padding  # type: ignore[return-value]


@torch.no_grad()
def load_factors(block: nn.Module, conv: nn.Conv2d, factors: dict[str, torch.Tensor]) -> None:
    """Write factor tensors into a block made by ``build_decomposed``."""
    dev, dt = conv.weight.device, conv.weight.dtype
    f = {k: v.to(device=dev, dtype=dt) for k, v in factors.items()}
    layers = list(block.children())
    if "core" in f:
        layers[0].weight.copy_(f["u_in"].T[:, :, None, None])
        layers[1].weight.copy_(f["core"])
        layers[2].weight.copy_(f["u_out"][:, :, None, None])
    else:
        kh, kw = conv.kernel_size
        r = f["out"].shape[1]
        layers[0].weight.copy_(f["inp"].T[:, :, None, None])
        layers[1].weight.copy_(f["vertical"].T.reshape(r, 1, kh, 1))
        layers[2].weight.copy_(f["horizontal"].T.reshape(r, 1, 1, kw))
        layers[3].weight.copy_(f["out"][:, :, None, None])
    if conv.bias is not None:
        layers[-1].bias.copy_(conv.bias)


def decompose_conv(
    conv: nn.Conv2d,
    method: str,
    rank: Rank,
    *,
    cache: FactorCache | None = None,
    wkey: str | None = None,
    inputs: torch.Tensor | None = None,
    input_moment: torch.Tensor | None = None,
) -> nn.Module:
    """Replace ``conv`` by its ``method`` decomposition at ``rank``; ``keep`` returns a copy.

    ``rank`` is ``(r_out, r_in)`` or an int for Tucker-2, an int for CP. Stride, padding, dilation
    and bias carry over. Factors come from ``cache`` (default: the process-wide disk cache).
    Without data they minimise the kernel error. With ``inputs`` (a batch of the layer's input
    activations, ``(N, I, H, W)``) or, cheaper, their ``input_moment`` (``input_moment(inputs)``)
    they minimise the layer's expected output error on such inputs (``rl_mtd.datafit``).
    """
    if inputs is not None:
        if input_moment is not None:
            raise RlMtdError("pass inputs or input_moment, not both")
        input_moment = datafit.input_moment(inputs)
    block = build_decomposed(conv, method, rank)
    if method == "keep":
        block.load_state_dict(conv.state_dict())
        return block
    rank = normalize_rank(conv, method, rank)
    factors = get_factors(conv, method, rank, cache=cache, wkey=wkey, input_moment=input_moment)
    load_factors(block, conv, factors)
    return block
