"""Baseline compression strategies to compare the learned agent against.

Every strategy turns a whole-model target ratio ``T`` into a :class:`~rl_mtd.policy.Policy`
whose predicted parameters are at most ``params_original / T``. ``T`` counts the whole model
(BatchNorm and the head included), the same definition as ``ProxyResult.compression_ratio``.

Strategies (``STRATEGIES``), one module each:

- ``tucker2`` / ``cp`` (:func:`uniform_policy`, in ``uniform``): one method and one per-layer
  reduction for every conv layer, the smallest reduction that reaches the target, then settled
  at the target (ranks raised, last layer first, where the budget allows).
- ``vbmf`` (:func:`vbmf_policy`, in ``uniform``): Tucker-2 ranks picked per layer by empirical
  variational Bayesian matrix factorisation of the kernel's two channel unfoldings, as in Kim et
  al., "Compression of Deep Convolutional Neural Networks for Fast and Low Power Mobile
  Applications" (ICLR 2016), then scaled by one common factor to meet the target and settled.
- ``sensitivity`` (:func:`sensitivity_policy`, in ``sensitivity``): the recipe of MTD, "Automatic
  Selection of Tensor Decomposition for Compressing Convolutional Neural Networks: A Case Study
  on VGG-type Networks" (IPDPSW 2021): measure every layer's accuracy under each method and level
  alone, then compress greedily where it costs least accuracy per parameter removed.
- ``random`` (:func:`random_search`, in ``random``): random per-layer choices pushed through the
  budget wall and settled at the budget, the best by proxy accuracy.
- ``local`` (:func:`local_search`, in ``local``): a hill climb from the sensitivity policy by
  random perturbations through the budget wall, the best by proxy accuracy.

``T`` may also be a :class:`~rl_mtd.budget.Budget` of parameters and/or MACs; every strategy
meets each limit it holds.

Every policy is built with ``Policy.from_choices`` from one :data:`MethodRank` (``(method,
rank)``) per conv layer and carries ``meta={"strategy": name, "target_ratio": T, ...}``.
:func:`strategy_policy` runs any of them by name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence

from rl_mtd.baselines._common import MethodRank
from rl_mtd.baselines.local import local_search
from rl_mtd.baselines.random import RANDOM_METHODS, random_policies, random_search
from rl_mtd.baselines.sensitivity import (
    SENSITIVITY_LEVELS,
    SensitivityStudy,
    StudyKey,
    sensitivity_policy,
)
from rl_mtd.baselines.uniform import uniform_policy, vbmf_policy, vbmf_ranks
from rl_mtd.budget import DEFAULT_LEVELS, Budget
from rl_mtd.errors import RlMtdError
from rl_mtd.policy import Policy
from rl_mtd.proxy import Proxy, ProxyResult

__all__ = [
    "DEFAULT_LEVELS",
    "DEFAULT_N_RANDOM",
    "RANDOM_METHODS",
    "SENSITIVITY_LEVELS",
    "STRATEGIES",
    "MethodRank",
    "SensitivityStudy",
    "StudyKey",
    "random_policies",
    "random_search",
    "local_search",
    "sensitivity_policy",
    "strategy_policy",
    "uniform_policy",
    "vbmf_policy",
    "vbmf_ranks",
]

STRATEGIES: tuple[str, ...] = ("tucker2", "cp", "vbmf", "sensitivity", "random", "local")
DEFAULT_N_RANDOM = 32


def strategy_policy(
    name: str,
    proxy: Proxy,
    target: Budget | float,
    *,
    seed: int = 0,
    n_random: int = DEFAULT_N_RANDOM,
    levels: Sequence[float] | None = None,
    methods: Sequence[str] | None = None,
    study: SensitivityStudy | None = None,
    progress: bool = False,
    on_evaluation: Callable[[Policy, ProxyResult], None] | None = None,
    settle_by: str = "moves",
) -> Policy:
    """The policy of strategy ``name`` (one of ``STRATEGIES``) for ``target`` on ``proxy``'s model.

    ``target`` is a whole-model parameter ratio or a ``rl_mtd.budget.Budget`` of parameters
    and/or MACs; every strategy meets all its limits.

    ``levels``/``methods`` apply to ``sensitivity`` (default ``SENSITIVITY_LEVELS``, Tucker-2 and
    CP) and ``random``/``local`` (default ``DEFAULT_LEVELS``, keep/Tucker-2/CP); ``seed`` and
    ``n_random`` (the proxy evaluations) and ``on_evaluation(policy, result)`` (called after
    each) to ``random`` and ``local``; ``study`` to ``sensitivity`` and ``local``;
    ``settle_by`` to ``sensitivity``. ``tucker2``, ``cp`` and ``vbmf`` need no evaluations.

    Raises:
        RlMtdError: for an unknown ``name`` (with the closest strategy name, if any), or what the
            strategy raises.
    """
    common = {"net": proxy.net, "width": proxy.width, "num_classes": proxy.num_classes}
    if name in ("tucker2", "cp"):
        return uniform_policy(proxy.model, name, target, **common)
    if name == "vbmf":
        return vbmf_policy(proxy.model, target, **common)
    if name == "sensitivity":
        return sensitivity_policy(
            proxy,
            target,
            levels=levels,
            methods=methods,
            study=study,
            progress=progress,
            settle_by=settle_by,
        )
    if name == "random":
        best, _ = random_search(
            proxy,
            target,
            n_random,
            seed=seed,
            methods=RANDOM_METHODS if methods is None else methods,
            levels=DEFAULT_LEVELS if levels is None else levels,
            progress=progress,
            on_evaluation=on_evaluation,
        )
        return best
    if name == "local":
        best, _ = local_search(
            proxy,
            target,
            n_random,
            seed=seed,
            study=study,
            methods=RANDOM_METHODS if methods is None else methods,
            levels=DEFAULT_LEVELS if levels is None else levels,
            on_evaluation=on_evaluation,
        )
        return best
    close = difflib.get_close_matches(str(name).lower(), STRATEGIES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RlMtdError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}.{hint}")
