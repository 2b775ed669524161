"""Settle by the study: give the slack a policy leaves under its budget to the layers where the
sensitivity study predicts a larger rank buys the most accuracy per share of the budget.

``rl_mtd.budget.settle`` raises ranks after the choices are made on a grid of levels (the grid
overshoots the budget). Given :data:`SettlePoints` it calls :func:`settle_by_points`, which
raises one rank step at a time, each time the step of the highest predicted accuracy gain per
share of the budget it spends; the prediction is the study's single-layer accuracy of that
layer and method, piecewise linear in log-parameters through the measured options and the kept
layer at the baseline's accuracy (:func:`study_points`). Without points it raises layer after
layer in a fixed order.

The points are plain data (JSON in a policy's and an agent's metadata), so a search
warm-started from the heuristic's policy settles exactly as the heuristic did.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from rl_mtd.decompose import DECOMPOSED, decomposed_params, next_rank
from rl_mtd.errors import RlMtdError

if TYPE_CHECKING:
    from rl_mtd.budget import BudgetMeter
    from rl_mtd.budget_table import BudgetTable

__all__ = [
    "SettlePoints",
    "check_settle_first",
    "check_settle_points",
    "settle_by_points",
    "raised",
    "settle_of",
    "study_points",
]

SettlePoints = tuple[tuple[int, str, tuple[tuple[int, float], ...]], ...]
"""Per (layer index, method): the (parameters, predicted accuracy) points of its curve."""

_EPS = 1e-6  # accuracy (fraction) credited to every step: on a flat curve the smallest goes first


def study_points(
    table: BudgetTable, results: Mapping[tuple[int, str, float], float], baseline_acc: float
) -> list[list[Any]]:
    """The settle points of a sensitivity study (JSON-ready lists): per measured (layer,
    method), each option's (parameters, accuracy) and the kept layer's (its parameters,
    ``baseline_acc``); levels sharing a rank give one point."""
    points: dict[tuple[int, str], dict[int, float]] = {}
    for (i, method, level), acc in results.items():
        layer = table.layers[i]
        params = layer.params((table.methods.index(method), table.levels.index(level)))
        points.setdefault((i, method), {layer.original: float(baseline_acc)})[params] = acc
    return [
        [i, m, [[p, a] for p, a in sorted(pts.items())]] for (i, m), pts in sorted(points.items())
    ]


def check_settle_points(points: Any, what: str = "settle points") -> SettlePoints:
    """``points`` (lists from JSON or tuples) as :data:`SettlePoints`; anything else (a hand
    edit, another version) raises ``RlMtdError`` naming ``what``."""
    out = []
    try:
        for i, method, curve in points:
            pts = tuple((int(p), float(a)) for p, a in curve)
            ok = (
                not isinstance(i, bool)
                and isinstance(i, int)
                and i >= 0
                and method in DECOMPOSED
                and pts
                and all(p > 0 and math.isfinite(a) for p, a in pts)
            )
            if not ok:
                raise ValueError
            out.append((i, method, tuple(sorted(pts))))
    except (TypeError, ValueError):
        raise RlMtdError(
            f"{what}: not a list of [layer index, method, [[parameters, accuracy], ...]] "
            "(edited, or written by another version); make them again (re-run the search)"
        ) from None
    return tuple(out)


def _curve(pts: tuple[tuple[int, float], ...]) -> Callable[[int], float]:
    xs = [math.log(p) for p, _ in pts]
    ys = [a for _, a in pts]

    def curve(params: int) -> float:
        x = math.log(max(params, 1))
        k = bisect.bisect_left(xs, x)
        if k == 0:
            return ys[0]
        if k == len(xs):
            return ys[-1]
        t = (x - xs[k - 1]) / max(xs[k] - xs[k - 1], 1e-12)
        return ys[k - 1] + t * (ys[k] - ys[k - 1])

    return curve


def raised(meter: BudgetMeter, choices: list[tuple[str, Any]], i: int) -> list | None:
    """``choices`` with layer ``i``'s rank one step larger (same method), or None where the
    layer is kept, has no larger rank, or the step would break ``meter``'s budget."""
    method, rank = choices[i]
    if method == "keep":
        return None
    bigger = next_rank(meter.convs[i][1], method, rank)
    if bigger is None:
        return None
    trial = [*choices[:i], (method, bigger), *choices[i + 1 :]]
    return trial if meter.meets(trial) else None


def check_settle_first(first: Any, what: str = "settle_first") -> tuple[int, ...]:
    """A settle order (layer indices, from JSON or code) as a tuple; anything else raises
    ``RlMtdError`` naming ``what``."""
    if not isinstance(first, list | tuple) or any(
        isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in first
    ):
        raise RlMtdError(
            f"{what} {first!r} is not a list of layer indices (edited, or written by another "
            "version); make it again (re-run the search)"
        )
    return tuple(first)


def _shares(meter: BudgetMeter, choices: list[tuple[str, Any]]) -> list[float]:
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


def settle_by_points(
    meter: BudgetMeter, choices: list[tuple[str, Any]], points: SettlePoints
) -> list[tuple[str, Any]]:
    """Raise ranks one step at a time while the budget allows, each time the step (over the
    decomposed layers with a curve in ``points``) of the highest ``(predicted gain + eps) /
    spent``, ``spent`` the largest share of a limit's remaining room the step takes (summing
    the step's shares of the limits instead fine-tuned 0.20 points lower at 16x + 8x MACs and
    0.17 higher at 8x + 6x MACs, 3 seeds each, BENCHMARKS.md 2026-12-07 evening). Ties go to
    the later layer. ``choices`` must meet the budget; the result does too."""
    curves = {(i, m): _curve(pts) for i, m, pts in points}
    out = list(choices)
    used = _shares(meter, out)
    while True:
        best: tuple[float, int] | None = None
        pick: tuple[list[tuple[str, Any]], list[float]] | None = None
        for i, (method, rank) in enumerate(out):
            curve = curves.get((i, method))
            trial = raised(meter, out, i) if curve is not None else None
            if trial is None:
                continue
            conv = meter.convs[i][1]
            new = _shares(meter, trial)
            # the price: the largest share of a limit's remaining room the step takes (room to
            # spare is cheap; under one limit this ranks the steps as their shares do)
            spent = max(max(n - u, 0.0) / max(1.0 - u, 1e-9) for n, u in zip(new, used))
            spent += 1e-12
            gain = curve(decomposed_params(conv, method, trial[i][1])) - curve(
                decomposed_params(conv, method, rank)
            )
            key = ((max(gain, 0.0) + _EPS) / spent, i)
            if best is None or key > best:
                best, pick = key, (trial, new)
        if pick is None:
            return out
        out, used = pick


def settle_of(meta: Mapping[str, Any]) -> tuple[tuple[int, ...], SettlePoints]:
    """How a policy's or an agent's metadata says to settle: ``(settle_first, settle_points)``
    (each empty where absent: last layer first)."""
    return (
        check_settle_first(meta.get("settle_first") or (), "the metadata's settle_first"),
        check_settle_points(meta.get("settle_points") or (), "the metadata's settle_points"),
    )
