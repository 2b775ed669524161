"""The random strategy: random per-layer choices pushed through the budget wall, the best by proxy
accuracy (the random agent of AMC's budget-constrained search)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
from torch import nn

from rl_mtd.budget import DEFAULT_LEVELS, Budget, BudgetMeter, check_levels, check_methods, settle
from rl_mtd.budget_table import BudgetTable, OptionIndex
from rl_mtd.decompose import METHODS
from rl_mtd.errors import RlMtdError
from rl_mtd.models import model_spec
from rl_mtd.policy import Policy
from rl_mtd.proxy import Proxy, ProxyResult

__all__ = ["RANDOM_METHODS", "random_policies", "random_search"]

RANDOM_METHODS: tuple[str, ...] = ("keep", "tucker2", "cp")


def random_policies(
    model: nn.Module,
    target: Budget | float,
    n: int,
    *,
    methods: Sequence[str] = RANDOM_METHODS,
    levels: Sequence[float] = DEFAULT_LEVELS,
    seed: int = 0,
    net: str | None = None,
    width: float | None = None,
    num_classes: int | None = None,
    settled: bool = True,
) -> list[Policy]:
    """``n`` random policies for ``model`` that each reach ``target``.

    Per layer, a (method, level) drawn uniformly from ``methods`` x ``levels`` (seeded numpy
    generator) goes through ``BudgetTable.wall``, which raises it just enough that the layers
    still to come can meet the budget (parameters and/or MACs), so every policy meets it (the
    random agent of AMC's budget-constrained search); then, like every other strategy, it is
    settled at the budget (``settle``: ranks raised, last layer first, while the budget holds),
    so it is not compared at a harder budget than the others; ``settled=False`` keeps every
    layer on the levels' grid (benchmarks that time or prefill grid options). ``net``, ``width`` and ``num_classes`` default to the model's
    ``model_spec`` (a model built by ``build_vgg``); ``num_classes`` otherwise to the head's
    outputs. The same seed gives the same policies.

    Raises:
        RlMtdError: for a target beyond what these methods and levels can reach, or a model that
            does not say which VGG it is when ``net``/``width`` are not given.
    """
    budget = Budget.of(target)
    if not budget.active:
        raise RlMtdError("give a target: a parameter ratio or a Budget with a limit")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RlMtdError(f"n must be a positive int, got {n!r}")
    spec = model_spec(model)
    if spec is not None:
        net = spec.net if net is None else net
        width = spec.width if width is None else width
        num_classes = spec.num_classes if num_classes is None else num_classes
    if num_classes is None:
        num_classes = getattr(getattr(model, "classifier", None), "out_features", 10)
    if net is None or width is None:
        raise RlMtdError("pass net=... and width=...: the model does not say which VGG it is")
    methods = check_methods(methods, METHODS)
    table = BudgetTable(model, methods, check_levels(levels))
    table.check_target(budget)
    meter = BudgetMeter(model, budget)
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        choices: list[OptionIndex] = []
        for _ in table.layers:
            draw = (int(rng.integers(len(table.methods))), int(rng.integers(len(table.levels))))
            choices.append(table.wall(choices, draw, budget))
        picked = table.to_choices(choices)
        if settled:
            picked = settle(meter, picked)
        meta = {
            "strategy": "random",
            **budget.meta(),
            "seed": seed,
            "index": k,
        }
        policy = Policy.from_choices(
            model,
            picked,
            net=net,
            width=width,
            num_classes=num_classes,
            meta=meta,
        )
        out.append(policy)
    return out


def random_search(
    proxy: Proxy,
    target: Budget | float,
    n: int,
    *,
    seed: int = 0,
    methods: Sequence[str] = RANDOM_METHODS,
    levels: Sequence[float] = DEFAULT_LEVELS,
    progress: bool = False,
    on_evaluation: Callable[[Policy, ProxyResult], None] | None = None,
) -> tuple[Policy, list[ProxyResult]]:
    """Score ``n`` :func:`random_policies` of ``proxy.model`` with the proxy; the best and every
    result. ``on_evaluation(policy, result)`` is called after each evaluation.

    The policies carry the proxy's net, width and classes. The best has the highest proxy
    accuracy; ties go to the higher compression ratio, then the earlier policy. Results are in
    the order of the policies.
    """
    policies = random_policies(
        proxy.model,
        target,
        n,
        methods=methods,
        levels=levels,
        seed=seed,
        net=proxy.net,
        width=proxy.width,
        num_classes=proxy.num_classes,
    )
    items: Iterable[Policy] = policies
    if progress:
        from tqdm import tqdm

        items = tqdm(policies, desc="random search", unit="policy")
    results = []
    for p in items:
        results.append(proxy.evaluate(p))
        if on_evaluation is not None:
            on_evaluation(p, results[-1])
    best = max(range(n), key=lambda k: (results[k].accuracy, results[k].compression_ratio, -k))
    return policies[best], results
