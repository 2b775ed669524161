"""The per-layer option table and the budget wall shared by the environment and the baselines.

Every conv layer has one option per (method, level): the rank ``rank_for_ratio`` gives and the
parameters it leaves. The wall (AMC's "action wall") raises a layer's level just enough that the
layers still to come can reach the target even at their strongest level.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from rl_mtd.decompose import (
    DECOMPOSED,
    METHODS,
    conv_layers,
    decomposed_params,
    layer_params,
    rank_for_ratio,
)
from rl_mtd.errors import RlMtdError
from rl_mtd.metrics import count_params

DEFAULT_LEVELS: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
"""Per-layer parameter reduction factors offered to the agent and the random strategies."""

OptionIndex = tuple[int, int]  # (method index, level index) into a BudgetTable


def check_target(target: Any, what: str = "target ratio") -> float:
    """A compression target: a finite number > 1 (a reduction factor)."""
    if isinstance(target, bool) or not isinstance(target, int | float):
        raise RlMtdError(f"{what} must be a number, got {target!r}")
    if not (math.isfinite(target) and target > 1):
        raise RlMtdError(
            f"{what} must be a finite reduction factor > 1 (e.g. 8 for 8x fewer), got {target!r}"
        )
    return float(target)


def check_levels(levels: Iterable[Any], what: str = "levels") -> tuple[float, ...]:
    """Per-layer reduction factors: distinct finite numbers > 1, weakest first."""
    out = tuple(levels)
    if not out:
        raise RlMtdError(f"{what}: give at least one reduction factor")
    for lv in out:
        if (
            isinstance(lv, bool)
            or not isinstance(lv, int | float)
            or not (math.isfinite(lv) and lv > 1)
        ):
            raise RlMtdError(f"{what} must be finite reduction factors > 1, got {lv!r}")
    if list(out) != sorted(set(out)):
        raise RlMtdError(f"{what} must be distinct and in increasing order, got {out}")
    return tuple(float(v) for v in out)


def check_methods(
    methods: Iterable[str], allowed: Sequence[str] = METHODS, *, need_decomposition: bool = True
) -> tuple[str, ...]:
    """Distinct method names from ``allowed``; with ``need_decomposition``, not ``keep`` alone."""
    out = tuple(methods)
    if not out:
        raise RlMtdError("give at least one method")
    unknown = [m for m in out if m not in allowed]
    if unknown:
        raise RlMtdError(f"unknown method {unknown[0]!r} here; choose from {', '.join(allowed)}")
    if len(set(out)) != len(out):
        raise RlMtdError(f"methods repeat: {out}")
    if need_decomposition and not any(m in DECOMPOSED for m in out):
        raise RlMtdError("methods must include tucker2 or cp; 'keep' alone compresses nothing")
    return out


@dataclass
class LayerOptions:
    name: str
    original: int
    options: dict[OptionIndex, tuple[Any, int]] = field(default_factory=dict)
    """(method index, level index) -> (rank, parameters)."""

    def params(self, choice: OptionIndex) -> int:
        return self.options[choice][1]

    def rank(self, choice: OptionIndex) -> Any:
        return self.options[choice][0]

    def cheapest(self) -> OptionIndex:
        return min(self.options, key=self.params)


class BudgetTable:
    """Options of every conv layer of ``model`` for ``methods`` x ``levels``."""

    def __init__(self, model: nn.Module, methods: Sequence[str], levels: Sequence[float]):
        self.methods = check_methods(methods, need_decomposition=False)
        self.levels = check_levels(levels)
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
        """Raise unless ``target`` (checked with :func:`check_target`) is within reach."""
        if target is not None and check_target(target) > self.max_ratio:
            raise RlMtdError(
                f"target ratio {target:g} is beyond what these levels can reach on this model "
                f"(at most {self.max_ratio:.1f}x); lower --target-ratio or add stronger --levels"
            )

    def used(self, choices: list[OptionIndex]) -> int:
        """Whole-model parameters of the layers chosen so far plus the fixed part."""
        return self.fixed + sum(self.layers[k].params(c) for k, c in enumerate(choices))

    def total(self, choices: list[OptionIndex]) -> int:
        if len(choices) != len(self.layers):
            raise ValueError(f"{len(choices)} choices for {len(self.layers)} layers")
        return self.used(choices)

    def wall(
        self, choices: list[OptionIndex], choice: OptionIndex, target: float | None
    ) -> OptionIndex:
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

        def fits(c: OptionIndex) -> bool:
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

    def to_choices(self, choices: list[OptionIndex]) -> list[tuple[str, Any]]:
        """``(method, rank)`` per layer, for ``Policy.from_choices``."""
        out = []
        for layer, c in zip(self.layers, choices):
            method = self.methods[c[0]]
            out.append((method, None if method == "keep" else layer.rank(c)))
        return out
