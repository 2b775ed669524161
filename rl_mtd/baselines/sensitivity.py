"""The sensitivity strategy: the recipe of MTD (IPDPSW 2021).

"Automatic Selection of Tensor Decomposition for Compressing Convolutional Neural Networks: A
Case Study on VGG-type Networks": measure every layer's accuracy under each method and level
alone (:class:`SensitivityStudy`), then compress greedily where it costs least accuracy per
parameter removed (:func:`sensitivity_policy`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import numpy as np

from rl_mtd.baselines._common import MethodRank, settle, unreachable
from rl_mtd.budget import Budget, BudgetMeter, check_levels, check_methods
from rl_mtd.budget_table import BudgetTable, LayerOptions, OptionIndex
from rl_mtd.decompose import DECOMPOSED, Rank
from rl_mtd.errors import RlMtdError
from rl_mtd.policy import Policy
from rl_mtd.proxy import Proxy
from rl_mtd.settle import check_settle_points, study_points

__all__ = [
    "SENSITIVITY_LEVELS",
    "SensitivityStudy",
    "StudyKey",
    "sensitivity_policy",
    "study_entries",
]

SENSITIVITY_LEVELS: tuple[float, ...] = (2, 4, 8, 16, 32, 64)
"""Levels of the per-layer sensitivity study."""

_EPS = 1e-4  # accuracy (fraction) added to every loss in the greedy score; see sensitivity_policy

StudyKey = tuple[int, str, float]  # (layer index, method, level)


class SensitivityStudy:
    """Proxy accuracy of the model with ONE conv layer compressed, for every layer x method x level.

    The per-layer study of MTD ("Automatic Selection of Tensor Decomposition for Compressing
    Convolutional Neural Networks: A Case Study on VGG-type Networks", IPDPSW 2021). Each entry
    compresses only that layer, at ``rank_for_ratio(conv, method, level)``, keeps the others
    and scores it with ``proxy.evaluate``. Options that would not shrink their layer (decomposed
    parameters >= the layer's own) are not measured: no greedy move can use them.

    Results are cached in :attr:`results` (``(layer index, method, level) -> accuracy``), so
    :meth:`run` evaluates each entry once however often it is called; levels that give the
    same rank share one evaluation. :attr:`evaluations` counts the ``proxy.evaluate`` calls that
    were not memoised by the proxy itself.
    """

    def __init__(
        self,
        proxy: Proxy,
        methods: Sequence[str] = DECOMPOSED,
        levels: Sequence[float] = SENSITIVITY_LEVELS,
    ):
        self.proxy = proxy
        self.methods = check_methods(methods, DECOMPOSED)
        self.levels = check_levels(levels)
        self.table = BudgetTable(proxy.model, self.methods, self.levels)
        self.results: dict[StudyKey, float] = {}
        self.evaluations = 0
        self.seconds = 0.0  # what measuring it cost (agents.studies.cached_study keeps it)
        self._by_rank: dict[tuple[int, str, Rank], float] = {}

    def keys(self) -> list[tuple[StudyKey, Rank]]:
        """Every entry the study measures, with its rank, in layer-major order."""
        return study_entries(self.table)

    def run(
        self, progress: bool = False, on_result: Callable[[], None] | None = None
    ) -> dict[StudyKey, float]:
        """Measure every entry not measured yet; return all results (a copy).

        ``on_result()`` is called after each new entry (a caller saves partial studies with it,
        so an interrupted study resumes where it stopped)."""
        todo = [(k, r) for k, r in self.keys() if k not in self.results]
        items: Iterable[tuple[StudyKey, Rank]] = todo
        if progress and todo:
            from tqdm import tqdm

            items = tqdm(todo, desc="sensitivity", unit="eval")
        n = len(self.table.layers)
        for key, rank in items:
            i, method, _ = key
            same = (i, method, rank)
            if same not in self._by_rank:
                choices: list[MethodRank] = [("keep", None)] * n
                choices[i] = (method, rank)
                policy = Policy.from_choices(
                    self.proxy.model,
                    choices,
                    net=self.proxy.net,
                    width=self.proxy.width,
                    num_classes=self.proxy.num_classes,
                )
                result = self.proxy.evaluate(policy)
                if not result.cached:
                    self.evaluations += 1
                self._by_rank[same] = result.accuracy
            self.results[key] = self._by_rank[same]
            if on_result is not None:
                on_result()
        return dict(self.results)

    def scores(self, baseline_acc: float) -> np.ndarray:
        """Per-layer features for the agent's observation, ``(layers, methods x levels)``.

        Entry ``[i, m * len(levels) + v]`` is the proxy accuracy lost with only layer ``i``
        compressed by method ``m`` at level ``v``, as a fraction of ``baseline_acc`` and clipped
        to 0..1; 1 for options the study does not measure (they would not shrink the layer).
        Runs what is not measured yet.
        """
        self.run()
        out = np.ones((len(self.table.layers), len(self.methods) * len(self.levels)), np.float32)
        for (i, method, level), acc in self.results.items():
            col = self.methods.index(method) * len(self.levels) + self.levels.index(level)
            out[i, col] = (baseline_acc - acc) / max(baseline_acc, 1e-8)
        return np.clip(out, 0.0, 1.0)


def sensitivity_policy(
    proxy: Proxy,
    target: Budget | float,
    *,
    levels: Sequence[float] | None = None,
    methods: Sequence[str] | None = None,
    study: SensitivityStudy | None = None,
    progress: bool = False,
    keep: bool = True,
    settle_by: str = "moves",
) -> Policy:
    """Greedy per-layer choice from a sensitivity study: the recipe of MTD (IPDPSW 2021).

    1. Run (or reuse) a :class:`SensitivityStudy`: the proxy accuracy with each single layer
       compressed by each method at each level (default levels ``SENSITIVITY_LEVELS``, methods
       ``tucker2`` and ``cp``).
    2. Start from all layers kept. Repeatedly apply, over all layers, the move to a stronger
       option (another method/level of that layer that uses no more of any budgeted resource
       than its current option and less of one still over budget) with the smallest
       ``(max(acc_current - acc_option, 0) + eps) / removed``, where ``acc_current`` is the
       study's accuracy for the layer's current option (the proxy's baseline accuracy while
       kept), ``eps = 1e-4`` (moves that lose nothing rank by what they remove), and
       ``removed`` the parameters (and, with a MACs limit, the MACs) removed, each as a share of
       the initial excess over its limit, summed over the limits not met yet. Ties go to more
       removed, then the earlier layer.
    3. Stop as soon as the predicted whole-model reductions meet the budget (``target`` is a
       parameter ratio or a ``Budget`` of parameters and/or MACs).
    4. Settle: the levels are coarse, so the last moves overshoot the target; the ranks of
       the layers moved last are raised first, as far as the budget allows (``settle``; then
       the other layers, last first; ``meta["settle_first"]``), or, with
       ``settle_by="study"``, one step at a time where the study predicts the most accuracy
       per share of the budget's remaining room (``rl_mtd.settle``; its curves are
       ``meta["settle_points"]``; level with the default within the spread, BENCHMARKS.md),
       so the policy sits at the target (within one rank step) rather than beyond it. A search
       warm-started from its options on the grid (``BudgetTable.options_of``) settles as it
       did (``EnvConfig.settle_first`` / ``settle_points``) and so starts at this very policy.

    The study is measured only after the target is known to be reachable. Passing ``study``
    reuses its cached evaluations (its methods and levels are used; ``levels``/``methods``, when
    given, must be among them, and only those are used); its proxy may score otherwise than
    ``proxy`` (a cheaper probe, fewer repair steps) but must be over the same baseline.

    ``keep=False`` (a search whose ``--methods`` lack ``keep``): no layer may stay whole, so
    each starts at its mildest option (the most parameters; ties to the higher study accuracy)
    instead of kept, and the greedy goes on from there.

    Raises:
        RlMtdError: when even the strongest option of every layer misses the target.
    """
    if settle_by not in ("study", "moves"):
        raise RlMtdError(f"settle_by must be 'study' or 'moves', not {settle_by!r}")
    budget = Budget.of(target)
    if not budget.active:
        raise RlMtdError("give a target: a parameter ratio or a Budget with a limit")
    if study is None:
        study = SensitivityStudy(
            proxy,
            methods=DECOMPOSED if methods is None else methods,
            levels=SENSITIVITY_LEVELS if levels is None else levels,
        )
    else:
        if study.proxy is not proxy and not _same_setup(study.proxy, proxy):
            raise RlMtdError(
                "the sensitivity study was made on another baseline or with other proxy "
                "settings (only its repair steps may differ from the proxy's)"
            )
        if methods is not None and not set(methods) <= set(study.methods):
            raise RlMtdError(f"methods {tuple(methods)} are not all in the study's {study.methods}")
        if levels is not None and not set(levels) <= set(study.levels):
            raise RlMtdError(f"levels {tuple(levels)} are not all in the study's {study.levels}")
    # A study over more than the caller allows serves it: the greedy moves only to these.
    use_methods = study.methods if methods is None else tuple(methods)
    use_levels = study.levels if levels is None else tuple(float(lv) for lv in levels)
    table = study.table
    allowed_options = [  # per layer, in the table's order (dicts: ordered, quick to look up)
        dict.fromkeys(
            c
            for c in layer.options
            if study.methods[c[0]] in use_methods and study.levels[c[1]] in use_levels
        )
        for layer in table.layers
    ]
    limits = _limits(table, budget)
    what = f"methods {', '.join(use_methods)} at levels {', '.join(map(str, use_levels))}"
    for cost, total, allowed, fixed, original in limits:
        best = fixed + sum(
            min(original(layer), min((cost(layer, c) for c in options), default=original(layer)))
            for layer, options in zip(table.layers, allowed_options)
        )
        if best > allowed:
            raise unreachable(budget, f"{total / best:.2f}x", what)
    results = study.run(progress=progress)

    n = len(table.layers)
    current: list[OptionIndex | None] = [None] * n  # None: kept
    used = [[original(layer) for layer in table.layers] for _, _, _, _, original in limits]
    totals = [total for _, total, _, _, _ in limits]
    # Relative floor: latency limits are in milliseconds, where 1 would dwarf the excess.
    excess0 = [max(total - allowed, 1e-9 * total) for _, total, allowed, _, _ in limits]
    cur_acc = [float(study.proxy.baseline_acc)] * n

    def key_of(i: int, opt: OptionIndex) -> StudyKey:
        return (i, study.methods[opt[0]], study.levels[opt[1]])

    def move(i: int, opt: OptionIndex) -> None:
        """Layer ``i`` to ``opt``: its costs, the totals and its study accuracy follow."""
        layer = table.layers[i]
        for k, lim in enumerate(limits):
            cost = lim[0](layer, opt)
            totals[k] -= used[k][i] - cost
            used[k][i] = cost
        current[i] = opt
        cur_acc[i] = results.get(key_of(i, opt), cur_acc[i])

    if not keep:
        for i, layer in enumerate(table.layers):
            move(
                i,
                max(
                    allowed_options[i],
                    key=lambda c, i=i, layer=layer: (
                        layer.params(c),
                        results.get(key_of(i, c), -1.0),
                    ),
                ),
            )
    moves: list[int] = []  # layers in the order the greedy moved them
    while any(t > lim[2] for t, lim in zip(totals, limits)):
        unmet = [k for k, (t, lim) in enumerate(zip(totals, limits)) if t > lim[2]]
        pick: tuple[tuple[float, float, int, int], int, OptionIndex] | None = None
        for i, layer in enumerate(table.layers):
            for order, opt in enumerate(layer.options):
                if opt not in allowed_options[i]:
                    continue
                key = key_of(i, opt)
                new = [lim[0](layer, opt) for lim in limits]
                if key not in results or any(v > used[k][i] for k, v in enumerate(new)):
                    continue
                removed = sum((used[k][i] - new[k]) / excess0[k] for k in unmet)
                if removed <= 0:
                    continue
                score = (max(cur_acc[i] - results[key], 0.0) + _EPS) / removed
                rank_key = (score, -removed, i, order)
                if pick is None or rank_key < pick[0]:
                    pick = (rank_key, i, opt)
        if pick is None:
            raise unreachable(budget, "less by these greedy moves", what)
        move(pick[1], pick[2])
        moves.append(pick[1])

    choices: list[MethodRank] = [
        ("keep", None) if c is None else (study.methods[c[0]], layer.rank(c))
        for c, layer in zip(current, table.layers)
    ]
    first = list(dict.fromkeys(reversed(moves)))  # the latest moves first
    points = (
        study_points(table, results, float(study.proxy.baseline_acc))
        if settle_by == "study"
        else []
    )
    choices = settle(BudgetMeter(proxy.model, budget), choices, first, check_settle_points(points))
    meta = {
        "strategy": "sensitivity",
        "settle_first": first,
        **({"settle_points": points} if points else {}),
        **budget.meta(),
        "levels": list(use_levels),
        "methods": list(use_methods),
    }
    return Policy.from_choices(
        proxy.model,
        choices,
        net=proxy.net,
        width=proxy.width,
        num_classes=proxy.num_classes,
        meta=meta,
    )


def study_entries(table: BudgetTable) -> list[tuple[StudyKey, Rank]]:
    """Every entry a study on ``table`` measures, with its rank, in layer-major order: each
    option that shrinks its layer (entries of one layer and method at the same rank share one
    evaluation and one factorisation)."""
    return [
        ((i, table.methods[mi], table.levels[li]), rank)
        for i, layer in enumerate(table.layers)
        for (mi, li), (rank, params, _) in layer.options.items()
        if params < layer.original
    ]


def _same_setup(a: Proxy, b: Proxy) -> bool:
    """Whether two proxies score the same baseline on the same data alike but for their repair
    steps (a study may be measured with fewer: ``--study-repair-steps``)."""
    return (
        a.wkeys == b.wkeys
        and replace(a.config, repair_steps=0) == replace(b.config, repair_steps=0)
        and (len(a.train_split), len(a.proxy_split)) == (len(b.train_split), len(b.proxy_split))
    )


def _limits(table: BudgetTable, budget: Budget) -> list[tuple]:
    """Per budgeted resource (parameters, MACs, predicted latency): (option cost, original
    total, allowed total, fixed part, a kept layer's cost)."""
    out = []
    if budget.params is not None:
        out.append(
            (
                LayerOptions.params,
                table.params_original,
                table.params_original / budget.params,
                table.fixed,
                lambda layer: layer.original,
            )
        )
    if budget.macs is not None:
        out.append(
            (
                LayerOptions.macs,
                table.macs_original,
                table.macs_original / budget.macs,
                table.fixed_macs,
                lambda layer: layer.original_macs,
            )
        )
    if budget.latency is not None:
        lm = budget.latency_model
        costs = table.latency_costs(lm)
        index = {layer.name: i for i, layer in enumerate(table.layers)}
        out.append(
            (
                lambda layer, c: costs[index[layer.name]][c],
                lm.original_ms,
                lm.original_ms / budget.latency,
                lm.rest_ms,
                lambda layer: lm.cost(index[layer.name], "keep", None),
            )
        )
    return out
