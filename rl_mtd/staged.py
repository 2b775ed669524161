"""Compression in stages: part of the way, a short fine-tune, re-factorise, on to the target.

One-shot compression decomposes every layer at its final rank and fine-tunes once. At high
ratios a gradual path may keep more: stage ``k`` of ``K`` takes each decomposed layer to the
geometric fraction ``rho ** (k / K)`` of its final parameter reduction ``rho`` (same method,
a larger rank), fine-tunes, and the next stage re-factorises the fine-tuned blocks (composed
back into one dense kernel first) at the next, smaller rank. The last stage is the policy itself.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from rl_mtd.conv_merge import compose_chain
from rl_mtd.decompose import (
    DecomposedConv,
    conv_layers,
    decompose_conv,
    normalize_rank,
    rank_for_ratio,
)
from rl_mtd.errors import RlMtdError
from rl_mtd.factor_cache import FactorCache
from rl_mtd.policy import Policy


def _at_least(rank, floor):
    if isinstance(floor, tuple):
        return tuple(max(a, b) for a, b in zip(rank, floor))
    return max(rank, floor)


def stage_policies(model: nn.Module, policy: Policy, stages: int) -> list[Policy]:
    """The ``stages`` policies of the gradual path to ``policy`` for the uncompressed ``model``.

    Each layer's rank never falls below its final rank, and the last policy is ``policy``.
    """
    if stages < 1:
        raise RlMtdError(f"stages must be >= 1, got {stages}")
    convs = conv_layers(model)
    path = []
    for k in range(1, stages):
        choices = []
        for (_, conv), c in zip(convs, policy.layers):
            if c.method == "keep":
                choices.append(("keep", None))
                continue
            final = normalize_rank(conv, c.method, c.rank)
            rank = rank_for_ratio(conv, c.method, c.ratio ** (k / stages))
            choices.append((c.method, _at_least(rank, final)))
        path.append(
            Policy.from_choices(
                model,
                choices,
                net=policy.net,
                width=policy.width,
                num_classes=policy.num_classes,
                meta={"stage": k, "stages": stages},
            )
        )
    return [*path, policy]


def dense_conv(module: nn.Module) -> nn.Conv2d:
    """The one conv a layer computes: itself, or a decomposed block's factors composed."""
    if isinstance(module, nn.Conv2d):
        return module
    if isinstance(module, DecomposedConv):
        return compose_chain(list(module))
    raise RlMtdError(f"expected a conv or a decomposed block, got {type(module).__name__}")


def refactorize(model: nn.Module, policy: Policy, *, cache: FactorCache | None = None) -> nn.Module:
    """A copy of ``model`` (whole or already decomposed) with each layer at ``policy``'s choice.

    A layer already at its choice (method and rank) is kept as it is, fine-tuned factors and all;
    any other is composed into its dense kernel and factorised anew (a stage never goes back to
    ``keep``). Original convs use ``cache`` (default: the shared disk cache); the throwaway
    factors of re-composed, fine-tuned kernels stay in a private in-memory cache.
    """
    out = copy.deepcopy(model)
    private = FactorCache(None)
    modules = dict(out.named_modules())
    for c in policy.layers:
        current = modules.get(c.name)
        if current is None:
            raise RlMtdError(f"the model has no layer {c.name!r} that the policy names")
        if isinstance(current, DecomposedConv):
            if c.method == "keep":
                raise RlMtdError(f"{c.name} is decomposed already; a stage cannot keep it whole")
            if current.method == c.method and current.rank == c.rank:
                continue
        elif c.method == "keep":
            continue
        fitted = cache if isinstance(current, nn.Conv2d) else private
        block = decompose_conv(dense_conv(current), c.method, c.rank, cache=fitted)
        parent, _, child = c.name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child, block)
    return out


def compress_in_stages(
    model: nn.Module,
    policy: Policy,
    stages: int,
    finetune: Callable[[nn.Module, int], object],
    *,
    cache: FactorCache | None = None,
) -> nn.Module:
    """Compress ``model`` to ``policy`` in ``stages`` steps, ``finetune(model, k)`` after each.

    ``finetune`` trains in place (stage ``k`` counts from 0) and sets its own share of the
    epochs; with ``stages=1`` this is one-shot compression and one fine-tune.
    """
    current = model
    for k, stage in enumerate(stage_policies(model, policy, stages)):
        current = refactorize(current, stage, cache=cache)
        finetune(current, k)
    return current
