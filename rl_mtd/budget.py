"""The per-layer option table and the budget wall shared by the environment and the baselines.

Every conv layer has one option per (method, level): the rank ``rank_for_ratio`` gives and the
parameters it leaves. The wall (AMC's "action wall") raises a layer's level just enough that the
layers still to come can reach the target even at their strongest level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from rl_mtd.decompose import conv_layers, decomposed_params, layer_params, rank_for_ratio
from rl_mtd.errors import RlMtdError
from rl_mtd.metrics import count_params

Choice = tuple[int, int]  # (method index, level index)


@dataclass
class LayerOptions:
    name: str
    original: int
    options: dict[Choice, tuple[Any, int]] = field(default_factory=dict)
    """(method index, level index) -> (rank, parameters)."""

    def params(self, choice: Choice) -> int:
        return self.options[choice][1]

    def rank(self, choice: Choice) -> Any:
        return self.options[choice][0]

    def cheapest(self) -> Choice:
        return min(self.options, key=self.params)


class BudgetTable:
    """Options of every conv layer of ``model`` for ``methods`` x ``levels``."""

    def __init__(self, model: nn.Module, methods: tuple[str, ...], levels: tuple[float, ...]):
        self.methods = tuple(methods)
        self.levels = tuple(levels)
        self.layers: list[LayerOptions] = []
        for name, conv in conv_layers(model):
            layer = LayerOptions(name, layer_params(conv))
            for mi, method in enumerate(self.methods):
                for li, level in enumerate(self.levels):
                    rank = rank_for_ratio(conv, method, level)
                    layer.options[(mi, li)] = (rank, decomposed_params(conv, method, rank))
            self.layers.append(layer)
        self.params_original = count_params(model)
        self.conv_original = sum(layer.original for layer in self.layers)
        self.fixed = self.params_original - self.conv_original  # BatchNorm, head
        # Fewest parameters layers i.. can have, for every i (0 past the end).
        self.min_after = [0] * (len(self.layers) + 1)
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            self.min_after[i] = self.min_after[i + 1] + layer.params(layer.cheapest())
        self.max_ratio = self.params_original / (self.fixed + self.min_after[0])

    def check_target(self, target: float | None) -> None:
        if target is not None and target > self.max_ratio:
            raise RlMtdError(
                f"target ratio {target:g} is beyond what these levels can reach on this model "
                f"(at most {self.max_ratio:.1f}x); lower --target-ratio or add stronger --levels"
            )

    def used(self, choices: list[Choice]) -> int:
        """Whole-model parameters of the layers chosen so far plus the fixed part."""
        return self.fixed + sum(self.layers[k].params(c) for k, c in enumerate(choices))

    def total(self, choices: list[Choice]) -> int:
        if len(choices) != len(self.layers):
            raise ValueError(f"{len(choices)} choices for {len(self.layers)} layers")
        return self.used(choices)

    def wall(self, choices: list[Choice], choice: Choice, target: float | None) -> Choice:
        """``choice`` for the next layer, raised just enough that ``target`` stays reachable.

        The level goes up within the chosen method first; a ``keep`` (or a method that cannot
        fit) moves to the first decomposition method, in ``methods`` order, that fits.
        """
        if target is None:
            return choice
        i = len(choices)
        layer = self.layers[i]
        allowed = self.params_original / target
        before, rest = self.used(choices), self.min_after[i + 1]

        def fits(c: Choice) -> bool:
            return before + layer.params(c) + rest <= allowed

        if fits(choice):
            return choice
        mi, li = choice
        order = [mi] if self.methods[mi] != "keep" else []
        order += [k for k, m in enumerate(self.methods) if m != "keep" and k not in order]
        for m in order:
            for lv in range(li if m == mi else 0, len(self.levels)):
                if fits((m, lv)):
                    return (m, lv)
        return layer.cheapest()  # only when the target is beyond max_ratio

    def to_choices(self, choices: list[Choice]) -> list[tuple[str, Any]]:
        """``(method, rank)`` per layer, for ``Policy.from_choices``."""
        out = []
        for layer, c in zip(self.layers, choices):
            method = self.methods[c[0]]
            out.append((method, None if method == "keep" else layer.rank(c)))
        return out
