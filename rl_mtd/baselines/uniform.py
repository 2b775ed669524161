"""Data-free strategies: one method at one per-layer reduction everywhere, and EVBMF ranks.

- ``tucker2`` / ``cp`` (:func:`uniform_policy`): one method and one per-layer reduction for every
  conv layer, the smallest reduction that reaches the target; then ranks raised, last layer
  first, where the budget still allows (integer ranks overshoot the target otherwise).
- ``vbmf`` (:func:`vbmf_policy`): Tucker-2 ranks picked per layer by empirical variational
  Bayesian matrix factorisation of the kernel's two channel unfoldings, as in Kim et al.,
  "Compression of Deep Convolutional Neural Networks for Fast and Low Power Mobile
  Applications" (ICLR 2016), then scaled by one common factor to meet the target, and settled
  like the uniform policies.
"""

from __future__ import annotations

import math

from torch import nn

from rl_mtd.baselines._common import MethodRank, unreachable
from rl_mtd.budget import Budget, BudgetMeter, settle
from rl_mtd.decompose import (
    DECOMPOSED,
    conv_layers,
    decomposed_params,
    layer_params,
    rank_for_ratio,
)
from rl_mtd.errors import RlMtdError
from rl_mtd.policy import Policy
from rl_mtd.vbmf import estimate_rank

__all__ = ["uniform_policy", "vbmf_policy", "vbmf_ranks"]


def _budget(target: Budget | float) -> Budget:
    budget = Budget.of(target)
    if not budget.active:
        raise RlMtdError("give a target: a parameter ratio or a Budget with a limit")
    return budget


def _budget_meta(budget: Budget, strategy: str) -> dict:
    return {"strategy": strategy, **budget.meta()}


# ----------------------------------------------------------------------------- uniform


def _uniform_choices(convs: list[tuple[str, nn.Conv2d]], method: str, r: float) -> list[MethodRank]:
    out: list[MethodRank] = []
    for _, conv in convs:
        rank = rank_for_ratio(conv, method, r)
        if decomposed_params(conv, method, rank) >= layer_params(conv):
            out.append(("keep", None))
        else:
            out.append((method, rank))
    return out


def uniform_policy(
    model: nn.Module,
    method: str,
    target: Budget | float,
    *,
    net: str,
    width: float,
    num_classes: int = 10,
) -> Policy:
    """Every conv layer decomposed with ``method`` at one shared per-layer reduction ``r``,
    then settled at the target.

    ``r`` is continuous; each layer gets ``rank_for_ratio(conv, method, r)``. The returned
    policy uses the smallest ``r`` (found by bisection in ``log r`` to a relative tolerance of
    1e-6) whose whole-model parameters are at most ``params_original / target`` (and MACs at
    most ``macs_original / target.macs`` for a ``Budget`` with a MACs limit). A layer that
    its decomposition at ``r`` would not shrink (decomposed parameters >= the layer's own, as for
    the 3-channel first conv at mild ``r``) is kept. Then, last layer first, ranks are raised
    as far as the budget allows (:func:`rl_mtd.budget.settle`), which lands the policy within one
    rank step of the target. ``meta["layer_ratio"]`` records ``r``.

    Raises:
        RlMtdError: for a method other than ``tucker2``/``cp`` or an unreachable target (every
            layer at rank 1 is still too big).
    """
    if method not in DECOMPOSED:
        raise RlMtdError(f"uniform_policy needs method 'tucker2' or 'cp', got {method!r}")
    budget = _budget(target)
    convs = conv_layers(model)
    if not convs:
        raise RlMtdError("the model has no conv layers to compress")
    meter = BudgetMeter(model, budget)

    def meets(r: float) -> bool:
        return meter.meets(_uniform_choices(convs, method, r))

    lo, hi = 1.0, 1.0
    if not meets(hi):
        # Past the largest layer's parameter count every layer sits at rank 1: nothing more.
        r_max = 2.0 * max(layer_params(c) for _, c in convs)
        hi = 2.0
        while not meets(hi):
            if hi >= r_max:
                reached = meter.describe(_uniform_choices(convs, method, hi))
                raise unreachable(budget, reached, f"{method} at rank 1 everywhere")
            lo, hi = hi, min(2.0 * hi, r_max)
        while hi / lo > 1.0 + 1e-6:  # meets(hi) and not meets(lo)
            mid = math.sqrt(lo * hi)
            if meets(mid):
                hi = mid
            else:
                lo = mid
    # Integer ranks make the whole-model ratio jump (16.6x for a 16x target at width 0.25):
    # give the excess back, last layers first, so every strategy is compared at the target.
    choices = settle(meter, _uniform_choices(convs, method, hi))
    meta = {**_budget_meta(budget, method), "layer_ratio": hi}
    return Policy.from_choices(
        model, choices, net=net, width=width, num_classes=num_classes, meta=meta
    )


# ----------------------------------------------------------------------------- VBMF


def vbmf_ranks(conv: nn.Conv2d) -> tuple[int, int]:
    """Tucker-2 ranks ``(r_out, r_in)`` of ``conv`` by EVBMF, data-free (Kim et al. 2016).

    ``r_out`` is the EVBMF rank of the mode-0 unfolding (``O x I*kh*kw``) of the kernel and
    ``r_in`` that of the mode-1 unfolding (``I x O*kh*kw``), each at least 1 (see
    :func:`rl_mtd.vbmf.estimate_rank`).
    """
    w = conv.weight.detach().cpu().double()
    o, i = w.shape[0], w.shape[1]
    r_out = estimate_rank(w.reshape(o, -1))
    r_in = estimate_rank(w.transpose(0, 1).reshape(i, -1))
    return min(o, r_out), min(i, r_in)


def _scaled(base: tuple[int, int], s: float, conv: nn.Conv2d) -> tuple[int, int]:
    # floor(x + 0.5) rounds half up, so the ranks never decrease as s grows.
    r_out = min(conv.out_channels, max(1, math.floor(s * base[0] + 0.5)))
    r_in = min(conv.in_channels, max(1, math.floor(s * base[1] + 0.5)))
    return r_out, r_in


def _vbmf_choices(
    convs: list[tuple[str, nn.Conv2d]], bases: list[tuple[int, int]], s: float
) -> list[MethodRank]:
    out: list[MethodRank] = []
    for (_, conv), base in zip(convs, bases):
        rank = _scaled(base, s, conv)
        if decomposed_params(conv, "tucker2", rank) >= layer_params(conv):
            out.append(("keep", None))
        else:
            out.append(("tucker2", rank))
    return out


def vbmf_policy(
    model: nn.Module,
    target: Budget | float,
    *,
    net: str,
    width: float,
    num_classes: int = 10,
) -> Policy:
    """Tucker-2 everywhere with EVBMF ranks (Kim et al., ICLR 2016), scaled to the target.

    Kim et al. use the EVBMF ranks of each kernel's two channel unfoldings (:func:`vbmf_ranks`)
    as they are, which fixes the compression. To compare strategies at one budget, both ranks
    of every layer are multiplied by one common factor ``s`` (rounded half up and clipped to
    ``[1, channels]``), so the layers keep their EVBMF proportions. ``s`` is the largest factor
    (bisection in ``log s``) whose whole-model ratio still reaches ``target``. A layer whose
    Tucker-2 at the scaled ranks would not shrink it is kept. Rounding leaves the ratio above
    the target (39.4x for 37x), so ranks are then raised, last layer first, as far as the budget
    allows (:func:`rl_mtd.budget.settle`). ``meta`` records ``scale`` (``s``) and the unscaled
    ``vbmf_ranks``.

    Raises:
        RlMtdError: for an unreachable target (Tucker-2 at rank (1, 1) everywhere is too big).
    """
    budget = _budget(target)
    convs = conv_layers(model)
    if not convs:
        raise RlMtdError("the model has no conv layers to compress")
    bases = [vbmf_ranks(conv) for _, conv in convs]
    meter = BudgetMeter(model, budget)

    def meets(s: float) -> bool:
        return meter.meets(_vbmf_choices(convs, bases, s))

    lo = 0.25 / max(max(b) for b in bases)  # every rank rounds to 0 -> clipped to 1
    hi = 2.0 * max(max(c.out_channels, c.in_channels) for _, c in convs)  # every rank full
    if not meets(lo):
        reached = meter.describe(_vbmf_choices(convs, bases, lo))
        raise unreachable(budget, reached, "Tucker-2 at rank (1, 1) everywhere")
    if meets(hi):
        lo = hi
    else:
        while hi / lo > 1.0 + 1e-9:  # meets(lo) and not meets(hi)
            mid = math.sqrt(lo * hi)
            if meets(mid):
                lo = mid
            else:
                hi = mid
    meta = {
        **_budget_meta(budget, "vbmf"),
        "scale": lo,
        "vbmf_ranks": [list(b) for b in bases],
    }
    choices = settle(meter, _vbmf_choices(convs, bases, lo))
    return Policy.from_choices(
        model,
        choices,
        net=net,
        width=width,
        num_classes=num_classes,
        meta=meta,
    )
