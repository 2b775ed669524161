"""Conv layers as decomposed blocks: Tucker-2 and CP, and a factor cache (their ranks and
parameter counts: ``rl_mtd.ranks``, importable from here too).

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

import torch
from torch import nn

from rl_mtd import datafit, factorize
from rl_mtd.datafit import collect_input_moments as collect_input_moments  # re-exported
from rl_mtd.datafit import input_moment as input_moment  # re-exported
from rl_mtd.errors import RlMtdError
from rl_mtd.factor_cache import FACTOR_VERSION as FACTOR_VERSION  # re-exported
from rl_mtd.factor_cache import FactorCache, default_cache, moment_key, weight_key

# Ranks and parameter counts live in rl_mtd.ranks; this is where users find them too.
from rl_mtd.ranks import DECOMPOSED as DECOMPOSED  # re-exported
from rl_mtd.ranks import METHODS as METHODS  # re-exported
from rl_mtd.ranks import RANK_RULE as RANK_RULE  # re-exported
from rl_mtd.ranks import Rank as Rank  # re-exported
from rl_mtd.ranks import decomposed_params as decomposed_params  # re-exported
from rl_mtd.ranks import layer_params as layer_params  # re-exported
from rl_mtd.ranks import max_cp_rank as max_cp_rank  # re-exported
from rl_mtd.ranks import next_rank as next_rank  # re-exported
from rl_mtd.ranks import normalize_rank as normalize_rank  # re-exported
from rl_mtd.ranks import params_after as params_after  # re-exported
from rl_mtd.ranks import rank_for_ratio as rank_for_ratio  # re-exported

log = logging.getLogger(__name__)


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


def _check_conv(conv: nn.Conv2d) -> None:
    if conv.groups != 1:
        raise RlMtdError(f"cannot decompose a grouped conv (groups={conv.groups})")


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
