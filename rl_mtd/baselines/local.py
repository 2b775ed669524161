"""Local search around the sensitivity heuristic: what a learned search has to beat.

``local`` (:func:`local_search`) starts from the MTD sensitivity policy and, for ``n`` proxy
evaluations, perturbs the best policy so far (a few layers moved to a neighbouring level or to a
random option, pushed through the budget wall) and keeps a perturbation when the proxy scores it
higher: a (1+1) hill climb. If a learned agent cannot beat this at the same number of
evaluations, the learning adds nothing over the heuristic plus trial and error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from rl_mtd.baselines.random import RANDOM_METHODS
from rl_mtd.baselines.sensitivity import SensitivityStudy, sensitivity_policy
from rl_mtd.budget import DEFAULT_LEVELS, Budget, BudgetMeter, settle
from rl_mtd.budget_table import BudgetTable, OptionIndex
from rl_mtd.errors import RlMtdError
from rl_mtd.policy import Policy
from rl_mtd.proxy import Proxy, ProxyResult
from rl_mtd.settle import SettlePoints, settle_of

__all__ = ["local_search"]

CHANGED_LAYERS = 2
"""Layers a perturbation changes."""

MAX_TRIES_PER_EVALUATION = 20
"""Candidates drawn per new evaluation at most (memoised ones are free but not unlimited)."""


def local_search(
    proxy: Proxy,
    target: Budget | float,
    n: int,
    *,
    seed: int = 0,
    study: SensitivityStudy | None = None,
    methods: Sequence[str] = RANDOM_METHODS,
    levels: Sequence[float] = DEFAULT_LEVELS,
    on_evaluation: Callable[[Policy, ProxyResult], None] | None = None,
) -> tuple[Policy, list[ProxyResult]]:
    """The best of ``n`` proxy evaluations of a hill climb from the sensitivity policy.

    ``n`` counts new evaluations: a candidate the proxy had memoised (a perturbation that walls
    and settles to a policy scored before) costs nothing and is not counted, as a search's
    repeated policies are not (``Proxy.evaluations``); at most ``MAX_TRIES_PER_EVALUATION`` times
    ``n`` candidates are drawn, for a neighbourhood with fewer than ``n`` policies in it.
    The first candidate is the sensitivity policy itself; each later one perturbs the best so
    far (at first the heuristic's options on the ``methods`` x ``levels`` grid, which walled
    and settled give its policy back) in ``CHANGED_LAYERS`` random layers: half the time one
    level up or down within the layer's method, else a random option. The whole candidate then
    goes through ``BudgetTable.wall`` layer by layer, so every candidate meets the budget, and
    is settled at it (``rl_mtd.budget.settle``: ranks raised while the budget holds, in the
    heuristic's way, its ``meta["settle_points"]`` / ``["settle_first"]``). A candidate
    replaces the best when its proxy accuracy is higher. Returns the best
    policy and every evaluated result in order. ``study`` reuses a sensitivity study
    (its evaluations are not counted in ``n``). ``on_evaluation(policy, result)`` is called
    after each evaluation (what a final check chooses among).
    """
    budget = Budget.of(target)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RlMtdError(f"n must be a positive int, got {n!r}")
    table = BudgetTable(proxy.model, methods, levels)
    table.check_target(budget)
    start = sensitivity_policy(proxy, budget, study=study)
    # The heuristic's own policy is the first evaluation; perturbations start from its options
    # on the grid.
    best = _walled(table, table.options_of(start), budget)
    rng = np.random.default_rng(seed)
    meter = BudgetMeter(proxy.model, budget)
    best_policy = replace(start, meta={**start.meta, "strategy": "local", "seed": seed, "index": 0})
    results = [proxy.evaluate(best_policy)]
    if on_evaluation is not None:
        on_evaluation(best_policy, results[0])
    best_acc = results[0].accuracy
    new = int(not results[0].cached)
    k = 0
    while new < n and k < MAX_TRIES_PER_EVALUATION * n:
        k += 1
        candidate = _perturb(table, best, rng)
        walled = _walled(table, candidate, budget)
        policy = _policy(table, proxy, walled, meter, seed, k, settle_of(start.meta))
        result = proxy.evaluate(policy)
        results.append(result)
        new += not result.cached
        if on_evaluation is not None:
            on_evaluation(policy, result)
        if result.accuracy > best_acc:
            best, best_acc, best_policy = walled, result.accuracy, policy
    return best_policy, results


def _perturb(
    table: BudgetTable, options: list[OptionIndex], rng: np.random.Generator
) -> list[OptionIndex]:
    out = list(options)
    n_levels = len(table.levels)
    for i in rng.choice(len(out), size=min(CHANGED_LAYERS, len(out)), replace=False):
        mi, li = out[i]
        if rng.random() < 0.5 and table.methods[mi] != "keep":
            out[i] = (mi, int(np.clip(li + rng.choice([-1, 1]), 0, n_levels - 1)))
        else:
            out[i] = (int(rng.integers(len(table.methods))), int(rng.integers(n_levels)))
    return out


def _walled(table: BudgetTable, options: list[OptionIndex], budget: Budget) -> list[OptionIndex]:
    walled: list[OptionIndex] = []
    for option in options:
        walled.append(table.wall(walled, option, budget))
    return walled


def _policy(
    table: BudgetTable,
    proxy: Proxy,
    options: list[OptionIndex],
    meter: BudgetMeter,
    seed: int,
    index: int,
    how: tuple[tuple[int, ...], SettlePoints],
) -> Policy:
    """The candidate as a policy, settled at the budget (the grid overshoots it) as the
    heuristic's start was (``how``: its order and study points, ``rl_mtd.settle.settle_of``)."""
    budget = meter.budget
    meta = {
        "strategy": "local",
        **budget.meta(),
        "seed": seed,
        "index": index,
    }
    choices = settle(meter, table.to_choices(options), *how)
    return Policy.from_choices(
        proxy.model,
        choices,
        net=proxy.net,
        width=proxy.width,
        num_classes=proxy.num_classes,
        meta=meta,
    )
