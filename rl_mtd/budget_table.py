"""The option table: every conv layer's options (method x level: rank, parameters, MACs) and the
budget wall over them that the environment and the searching baselines share.

The wall (AMC's "action wall") raises a layer's level just enough that the layers still to come
can reach the target even at their strongest level. The budgets themselves and their checks:
``rl_mtd.budget``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from rl_mtd.budget import (
    Budget,
    check_levels,
    check_methods,
    conv_input_sizes,
    option_macs,
)
from rl_mtd.decompose import (
    conv_layers,
    decomposed_params,
    layer_params,
    rank_for_ratio,
)
from rl_mtd.errors import RlMtdError
from rl_mtd.metrics import count_macs, count_params

if TYPE_CHECKING:
    from rl_mtd.latency import LatencyModel

OptionIndex = tuple[int, int]  # (method index, level index) into a BudgetTable


@dataclass
class LayerOptions:
    name: str
    original: int
    original_macs: int = 0
    options: dict[OptionIndex, tuple[Any, int, int]] = field(default_factory=dict)
    """(method index, level index) -> (rank, parameters, MACs)."""

    def params(self, choice: OptionIndex) -> int:
        return self.options[choice][1]

    def macs(self, choice: OptionIndex) -> int:
        return self.options[choice][2]

    def rank(self, choice: OptionIndex) -> Any:
        return self.options[choice][0]

    def cheapest(self) -> OptionIndex:
        return min(self.options, key=self.params)

    def fewest_macs(self) -> OptionIndex:
        return min(self.options, key=self.macs)


class BudgetTable:
    """Options of every conv layer of ``model`` for ``methods`` x ``levels``: rank, parameters
    and MACs of each, and the wall that keeps a budget of parameters and/or MACs reachable."""

    def __init__(self, model: nn.Module, methods: Sequence[str], levels: Sequence[float]):
        self.methods = check_methods(methods, need_decomposition=False)
        self.levels = check_levels(levels)
        self.model = model
        sizes = conv_input_sizes(model)
        self.layers: list[LayerOptions] = []
        for name, conv in conv_layers(model):
            hw = sizes[name]
            layer = LayerOptions(name, layer_params(conv), option_macs(conv, "keep", None, hw))
            for mi, method in enumerate(self.methods):
                for li, level in enumerate(self.levels):
                    rank = rank_for_ratio(conv, method, level)
                    layer.options[(mi, li)] = (
                        rank,
                        decomposed_params(conv, method, rank),
                        option_macs(conv, method, rank, hw),
                    )
            self.layers.append(layer)
        self.params_original = count_params(model)
        self.conv_original = sum(layer.original for layer in self.layers)
        self.fixed = self.params_original - self.conv_original  # BatchNorm, head
        self.macs_original = count_macs(model)
        self.fixed_macs = self.macs_original - sum(layer.original_macs for layer in self.layers)
        # Fewest parameters / MACs layers i.. can have, for every i (0 past the end).
        n = len(self.layers)
        self.min_after, self.min_macs_after = [0] * (n + 1), [0] * (n + 1)
        for i in range(n - 1, -1, -1):
            layer = self.layers[i]
            self.min_after[i] = self.min_after[i + 1] + layer.params(layer.cheapest())
            self.min_macs_after[i] = self.min_macs_after[i + 1] + layer.macs(layer.fewest_macs())
        # Where some layer's fewest-parameter options all cost more MACs than its fewest-MACs
        # ones (strided convs: CP can be smaller and slower than Tucker-2), the two minima are
        # not reached together, and a parameter and MACs budget is judged as a latency one is.
        self.minima_coincide = all(
            any(
                layer.params(c) == layer.params(layer.cheapest())
                and layer.macs(c) == layer.macs(layer.fewest_macs())
                for c in layer.options
            )
            for layer in self.layers
        )
        self.max_ratio = self.params_original / (self.fixed + self.min_after[0])
        self.max_macs_ratio = self.macs_original / (self.fixed_macs + self.min_macs_after[0])
        self._latency: dict[int, tuple[LatencyModel, list[dict[OptionIndex, float]]]] = {}

    def latency_costs(self, model: LatencyModel) -> list[dict[OptionIndex, float]]:
        """Each layer's predicted milliseconds at each option (``model.cost``; memoised)."""
        cached = self._latency.get(id(model))
        if cached is None or cached[0] is not model:
            costs = [
                {c: model.cost(i, self.methods[c[0]], layer.rank(c)) for c in layer.options}
                for i, layer in enumerate(self.layers)
            ]
            cached = self._latency[id(model)] = (model, costs)
        return cached[1]

    def _latency_min_after(self, model: LatencyModel) -> list[float]:
        costs = self.latency_costs(model)
        out = [0.0] * (len(costs) + 1)
        for i in range(len(costs) - 1, -1, -1):
            out[i] = out[i + 1] + min(costs[i].values())
        return out

    def check_target(
        self, target: Budget | float | None, *, fixable_by_levels: bool = True
    ) -> None:
        """Raise unless the budget (or parameter target) is within reach of these options.
        ``fixable_by_levels=False``: the options are already the strongest there are (a
        replay's check), so the message does not suggest stronger --levels."""
        budget = Budget.of(target)
        reach = "these levels" if fixable_by_levels else "any decomposition"
        more = " or add stronger --levels" if fixable_by_levels else ""
        limits = self._limits(budget)
        if self._minima_apart(budget, limits) and any(
            f + r > a
            for (_, f, a), r in zip(limits, self._least_after(budget, limits, 0), strict=True)
        ):
            if budget.latency is not None:
                raise RlMtdError(
                    f"target speed-up {budget.latency:g} together with the other targets is "
                    f"beyond what {reach} can reach on this model and device (no one "
                    "option per layer meets them all); lower --target-latency or the others"
                )
            raise RlMtdError(
                f"target ratio {budget.params:g} together with MACs reduction {budget.macs:g} "
                f"is beyond what {reach} can reach on this model (its smallest layers are "
                "not its cheapest in MACs, and no one option per layer found meets both); "
                "lower --target-ratio or --target-macs"
            )
        if budget.latency is not None:
            lm = budget.latency_model
            fastest = lm.original_ms / (lm.rest_ms + self._latency_min_after(lm)[0])
            if budget.latency > fastest:
                raise RlMtdError(
                    f"target speed-up {budget.latency:g} is beyond what {reach} can reach "
                    f"on this model and device (at most {fastest:.1f}x predicted at batch "
                    f"{lm.batch_size}); lower --target-latency{more}"
                )
        if budget.params is not None and budget.params > self.max_ratio:
            raise RlMtdError(
                f"target ratio {budget.params:g} is beyond what {reach} can reach on this "
                f"model (at most {self.max_ratio:.1f}x); lower --target-ratio{more}"
            )
        if budget.macs is not None and budget.macs > self.max_macs_ratio:
            raise RlMtdError(
                f"target MACs reduction {budget.macs:g} is beyond what {reach} can reach on "
                f"this model (at most {self.max_macs_ratio:.1f}x); lower --target-macs{more}"
            )

    def used(self, choices: list[OptionIndex]) -> int:
        """Whole-model parameters of the layers chosen so far plus the fixed part."""
        return self.fixed + sum(self.layers[k].params(c) for k, c in enumerate(choices))

    def used_macs(self, choices: list[OptionIndex]) -> int:
        """Whole-model MACs of the layers chosen so far plus the fixed part (the head)."""
        return self.fixed_macs + sum(self.layers[k].macs(c) for k, c in enumerate(choices))

    def total(self, choices: list[OptionIndex]) -> int:
        if len(choices) != len(self.layers):
            raise ValueError(f"{len(choices)} choices for {len(self.layers)} layers")
        return self.used(choices)

    def total_macs(self, choices: list[OptionIndex]) -> int:
        if len(choices) != len(self.layers):
            raise ValueError(f"{len(choices)} choices for {len(self.layers)} layers")
        return self.used_macs(choices)

    def wall(
        self, choices: list[OptionIndex], choice: OptionIndex, target: Budget | float | None
    ) -> OptionIndex:
        """``choice`` for the next layer, raised just enough that the budget stays reachable.

        An option fits when, with the later layers at the least they can cost
        (``_least_after``: each at its smallest where one option is smallest in every limit,
        else one option per layer with the smallest worst share of the allowances, a
        conservative completion), the whole model can still meet each limit of the budget.
        The level goes up within the chosen method first; a ``keep`` (or a method that cannot
        fit) moves to the first decomposition method, in ``methods`` order, that fits. ``target`` is a ``Budget`` or a parameter target.
        """
        budget = Budget.of(target)
        if not budget.active:
            return choice
        i = len(choices)
        layer = self.layers[i]
        over = self._overshoot(choices, budget)

        def fits(c: OptionIndex) -> bool:
            return over(layer, c) <= 0

        if fits(choice):
            return choice
        mi, li = choice
        order = [mi] if self.methods[mi] != "keep" else []
        order += [k for k, m in enumerate(self.methods) if m != "keep" and k not in order]
        for m in order:
            for lv in range(li if m == mi else 0, len(self.levels)):
                if fits((m, lv)):
                    return (m, lv)
        return min(layer.options, key=lambda c: over(layer, c))  # only beyond reach

    def _limits(self, budget: Budget) -> list[tuple]:
        """Per limit of ``budget``: (cost of option c at layer k, fixed part, allowed total)."""
        out: list[tuple] = []
        if budget.params is not None:
            out.append(
                (
                    lambda k, c: self.layers[k].params(c),
                    self.fixed,
                    self.params_original / budget.params,
                )
            )
        if budget.macs is not None:
            out.append(
                (
                    lambda k, c: self.layers[k].macs(c),
                    self.fixed_macs,
                    self.macs_original / budget.macs,
                )
            )
        if budget.latency is not None:
            lm = budget.latency_model
            costs = self.latency_costs(lm)
            out.append((lambda k, c: costs[k][c], lm.rest_ms, lm.original_ms / budget.latency))
        return out

    def _minima_apart(self, budget: Budget, limits: list[tuple]) -> bool:
        """Whether the budget has several limits whose per-layer minima are not reached by one
        option (always with latency beside another limit)."""
        if len(limits) < 2:
            return False
        return budget.latency is not None or not self.minima_coincide

    def _least_after(self, budget: Budget, limits: list[tuple], start: int) -> list[float]:
        """Per limit, the least that layers ``start``.. can cost while every limit holds.

        Parameters and MACs are both least at a layer's smallest options (for stride-1 convs;
        ``minima_coincide`` checks it), so each limit takes its own minimum. Latency is not (a
        kept layer can be the fastest and the largest), so where the minima are apart every
        later layer takes the one option with the smallest worst share of the allowances, for
        every limit alike: a completion that exists, so the wall never accepts a layer that
        leaves the budget out of reach."""
        if not self._minima_apart(budget, limits):
            out: list[float] = []
            if budget.params is not None:
                out.append(self.min_after[start])
            if budget.macs is not None:
                out.append(self.min_macs_after[start])
            if budget.latency is not None:
                out.append(self._latency_min_after(budget.latency_model)[start])
            return out
        totals = [0.0] * len(limits)
        for k in range(start, len(self.layers)):
            best = min(
                self.layers[k].options,
                key=lambda c, k=k: max(cost(k, c) / allowed for cost, _, allowed in limits),
            )
            for j, (cost, _, _) in enumerate(limits):
                totals[j] += cost(k, best)
        return totals

    def _overshoot(self, choices: list[OptionIndex], budget: Budget):
        """``(layer, option) -> how far past the budget`` (<= 0: it fits), as a fraction of
        the allowance, the worst of parameters, MACs and latency, with later layers at the
        least they can cost (``_least_after``)."""
        i = len(choices)
        limits = self._limits(budget)
        rests = self._least_after(budget, limits, i + 1)
        bases = [
            fixed + sum(cost(k, c) for k, c in enumerate(choices)) + rest
            for (cost, fixed, _), rest in zip(limits, rests, strict=True)
        ]

        def over(layer: LayerOptions, c: OptionIndex) -> float:  # the wall asks about layer i
            return max(
                (base + cost(i, c)) / allowed - 1.0
                for (cost, _, allowed), base in zip(limits, bases, strict=True)
            )

        return over

    def options_of(self, policy: Any) -> list[OptionIndex]:
        """Each layer's option on this grid for a ``Policy``'s choice: the largest option of the
        same method within the layer's size. A policy settled at a budget
        (:func:`rl_mtd.budget.settle`) has ranks just above a level's, and these options, walled
        and settled again in the same order (``settle``'s ``first``) give the same policy back
        (in another order the slack would land on other layers: a neighbour); the nearest option by
        size would often be the level above, and a different policy. A method the grid lacks
        falls back to the nearest option by size (the mildest when ``keep`` is missing)."""
        out = []
        for layer, choice in zip(self.layers, policy.layers, strict=True):
            same = [c for c in layer.options if self.methods[c[0]] == choice.method]
            size = layer.original / choice.ratio
            within = [c for c in same if layer.params(c) <= size * (1 + 1e-9)]
            if within:
                out.append(max(within, key=layer.params))
            elif same:
                out.append(min(same, key=layer.params))
            elif choice.method == "keep":
                out.append(max(layer.options, key=layer.params))
            else:
                out.append(min(layer.options, key=lambda c: abs(layer.params(c) - size)))
        return out

    def to_choices(self, choices: list[OptionIndex]) -> list[tuple[str, Any]]:
        """``(method, rank)`` per layer, for ``Policy.from_choices``."""
        out = []
        for layer, c in zip(self.layers, choices):
            method = self.methods[c[0]]
            out.append((method, None if method == "keep" else layer.rank(c)))
        return out
