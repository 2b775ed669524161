"""Settle by the study: give the slack a policy leaves under its budget to the layers where the
sensitivity study says a larger rank buys the most accuracy per unit of budget.

``rl_mtd.budget.settle`` raises one layer after another in a fixed order, each as far as the
budget allows; :func:`study_settle` raises one rank step at a time, each time the step with the
highest predicted accuracy gain per share of the budget it spends. The prediction is the study's
single-layer accuracy of that layer and method, interpolated in log-parameters between the
measured levels (and the kept layer at the baseline's accuracy).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping

from rl_mtd.baselines._common import MethodRank
from rl_mtd.budget import BudgetMeter
from rl_mtd.budget_table import BudgetTable
from rl_mtd.ranks import decomposed_params, next_rank

__all__ = ["accuracy_curves", "study_settle"]

_EPS = 1e-6  # accuracy (fraction) credited to every step: a flat curve spends the least first

Curve = Callable[[int], float]  # parameters of one layer -> predicted single-layer accuracy


def accuracy_curves(
    table: BudgetTable, results: Mapping[tuple[int, str, float], float], baseline_acc: float
) -> dict[tuple[int, str], Curve]:
    """Per (layer, method): the study's accuracy as a function of the layer's parameters,
    piecewise linear in log-parameters through the measured options and (the layer's own
    parameters, ``baseline_acc``); flat beyond the strongest measured option."""
    points: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for (i, method, level), acc in results.items():
        mi, li = table.methods.index(method), table.levels.index(level)
        params = table.layers[i].params((mi, li))
        points.setdefault((i, method), []).append((math.log(params), acc))
    curves: dict[tuple[int, str], Curve] = {}
    for (i, method), pts in points.items():
        pts.append((math.log(table.layers[i].original), baseline_acc))
        pts = sorted(dict(sorted(pts, reverse=True)).items())  # levels sharing a rank: one point
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]

        def curve(params: int, xs=xs, ys=ys) -> float:
            x = math.log(max(params, 1))
            k = bisect.bisect_left(xs, x)
            if k == 0:
                return ys[0]
            if k == len(xs):
                return ys[-1]
            t = (x - xs[k - 1]) / max(xs[k] - xs[k - 1], 1e-12)
            return ys[k - 1] + t * (ys[k] - ys[k - 1])

        curves[(i, method)] = curve
    return curves


def _shares(meter: BudgetMeter, choices: list[MethodRank]) -> list[float]:
    """How much of each limit of ``meter``'s budget ``choices`` use (1 = all of it)."""
    b = meter.budget
    out = []
    if b.params is not None:
        out.append(meter.params(choices) * b.params / meter.params_original)
    if b.macs is not None:
        out.append(meter.macs(choices) * b.macs / meter.macs_original)
    if b.latency is not None:
        lm = b.latency_model
        out.append(lm.predict(choices) * b.latency / lm.original_ms)
    return out


def study_settle(
    meter: BudgetMeter, choices: list[MethodRank], curves: Mapping[tuple[int, str], Curve]
) -> list[MethodRank]:
    """Raise ranks one step at a time while the budget allows, each time the step (over all
    decomposed layers with a curve) of the highest ``(predicted gain + eps) / spent``, where
    ``spent`` sums the step's added share of each limit. Ties go to the later layer (the
    ``settle`` default's first). ``choices`` must meet the budget; the result does too."""
    out = list(choices)
    used = _shares(meter, out)
    while True:
        best: tuple[float, int] | None = None
        pick: tuple[list[MethodRank], list[float], int] | None = None
        for i, (method, rank) in enumerate(out):
            curve = curves.get((i, method))
            if method == "keep" or curve is None:
                continue
            conv = meter.convs[i][1]
            bigger = next_rank(conv, method, rank)
            if bigger is None:
                continue
            trial = [*out[:i], (method, bigger), *out[i + 1 :]]
            if not meter.meets(trial):
                continue
            new = _shares(meter, trial)
            spent = sum(max(n - u, 0.0) for n, u in zip(new, used)) + 1e-12
            gain = curve(decomposed_params(conv, method, bigger)) - curve(
                decomposed_params(conv, method, rank)
            )
            key = ((max(gain, 0.0) + _EPS) / spent, i)
            if best is None or key > best:
                best, pick = key, (trial, new, i)
        if pick is None:
            return out
        out, used = pick[0], pick[1]
