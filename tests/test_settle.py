"""Tests for settling by a study's points (rl_mtd.settle) and the heuristic's ``settle_by``."""

from __future__ import annotations

import json
import math

import pytest

from rl_mtd.baselines import SensitivityStudy, sensitivity_policy
from rl_mtd.budget import Budget, BudgetMeter, settle
from rl_mtd.decompose import next_rank
from rl_mtd.errors import RlMtdError
from rl_mtd.settle import check_settle_points, settle_of, study_points

LEVELS = (4, 16, 64)


def _settled(meter: BudgetMeter, choices) -> bool:
    """No decomposed layer's rank can grow by one step within the budget."""
    for i, (method, rank) in enumerate(choices):
        if method == "keep":
            continue
        bigger = next_rank(meter.convs[i][1], method, rank)
        if bigger is not None and meter.meets([*choices[:i], (method, bigger), *choices[i + 1 :]]):
            return False
    return True


def _points(meter: BudgetMeter, steep: int, layers=None):
    """Every layer's predicted accuracy flat but ``steep``'s, which rises with its parameters."""
    out = []
    for i, (_, conv) in enumerate(meter.convs):
        if layers is not None and i not in layers:
            continue
        big = conv.weight.numel()
        for m in ("tucker2", "cp"):
            out.append((i, m, ((1, 0.0), (big, 1.0)) if i == steep else ((1, 0.5), (big, 0.5))))
    return check_settle_points(out)


def _start(meter: BudgetMeter):
    n = len(meter.convs)
    start = [("keep", None), *[("tucker2", (2, 2))] * (n - 1)]  # far beyond 4x
    assert meter.meets(start)
    return start


def test_the_slack_goes_where_the_study_predicts_the_most_accuracy(tiny_baseline):
    """A layer whose predicted accuracy rises with its rank is raised first, as far as the
    budget allows (what the ordered settle gives a layer named first); the rest of the slack
    goes to the others; the result meets the budget and no step more fits."""
    meter = BudgetMeter(tiny_baseline, Budget(4.0))
    start, n = _start(meter), len(meter.convs)
    results = []
    for steep in (1, n - 2):
        out = settle(meter, start, points=_points(meter, steep))
        assert meter.meets(out) and _settled(meter, out)
        assert out[steep] == settle(meter, start, [steep])[steep] != start[steep]
        results.append(out)
    assert results[0] != results[1]


def test_layers_without_points_and_kept_layers_are_not_raised(tiny_baseline):
    meter = BudgetMeter(tiny_baseline, Budget(4.0))
    start = _start(meter)
    out = settle(meter, start, points=_points(meter, 2, layers={2}))
    assert out[0] == ("keep", None)
    assert [c for i, c in enumerate(out) if i != 2] == [c for i, c in enumerate(start) if i != 2]
    assert out[2] != start[2] and meter.meets(out)


def test_a_macs_limit_holds_too(tiny_baseline):
    meter = BudgetMeter(tiny_baseline, Budget(3.0, macs=3.0))
    start = [("tucker2", (2, 2)) if i else ("tucker2", (2, 1)) for i in range(len(meter.convs))]
    assert meter.meets(start)
    out = settle(meter, start, points=_points(meter, 3))
    assert meter.meets(out) and _settled(meter, out) and out != start


def test_study_points_pass_through_every_option_and_the_kept_layer(tiny_proxy):
    study = SensitivityStudy(tiny_proxy, levels=LEVELS)
    table = study.table
    for key, _ in study.keys():  # an option's accuracy follows its parameters, as in a study
        i, method, level = key
        layer = table.layers[i]
        params = layer.params((table.methods.index(method), table.levels.index(level)))
        study.results[key] = 0.5 + 0.4 * math.log(params) / math.log(layer.original) - 0.01 * i
    points = study_points(table, study.results, 0.95)
    again = check_settle_points(json.loads(json.dumps(points)))  # as read from a policy file
    curves = {(i, m): dict(pts) for i, m, pts in again}
    for (i, method, level), acc in study.results.items():
        layer = table.layers[i]
        params = layer.params((table.methods.index(method), table.levels.index(level)))
        assert curves[(i, method)][params] == pytest.approx(acc)
        assert curves[(i, method)][layer.original] == 0.95
    assert all([p for p, _ in pts] == sorted(p for p, _ in pts) for _, _, pts in again)


@pytest.mark.parametrize(
    "bad",
    [
        "points",
        [[0, "cp", []]],
        [["a", "cp", [[10, 0.5]]]],
        [[True, "cp", [[10, 0.5]]]],
        [[-1, "cp", [[10, 0.5]]]],
        [[0, "svd", [[10, 0.5]]]],
        [[0, "cp", [[0, 0.5]]]],
        [[0, "cp", [[10, float("nan")]]]],
        [[0, "cp", [[10]]]],
        [[0, "cp"]],
    ],
)
def test_damaged_points_are_refused_naming_where_they_came_from(bad):
    with pytest.raises(RlMtdError, match="agent file a.zip: its settle_points: not a list"):
        check_settle_points(bad, "agent file a.zip: its settle_points")
    with pytest.raises(RlMtdError, match="settle_points"):
        settle_of({"settle_points": bad})


def test_the_heuristic_settles_by_its_study_when_asked(tiny_baseline, tiny_proxy):
    """Its policy meets the target with no step more fitting and records its points (so a
    search starting from it settles alike); ``settle_by="moves"`` (the default) records only
    its order; an unknown way is refused."""
    study = SensitivityStudy(tiny_proxy, levels=LEVELS)
    n = len(study.table.layers)
    for key, _ in study.keys():
        i, _, level = key
        study.results[key] = tiny_proxy.baseline_acc - (
            0.02 * math.log2(level) if i == n - 2 else 0
        )
    meter = BudgetMeter(tiny_baseline, Budget(6.0))
    policy = sensitivity_policy(tiny_proxy, 6, study=study, settle_by="study")
    assert meter.meets(policy.choices()) and _settled(meter, policy.choices())
    first, points = settle_of(policy.meta)
    assert points == check_settle_points(
        study_points(study.table, study.results, tiny_proxy.baseline_acc)
    )
    moves = sensitivity_policy(tiny_proxy, 6, study=study)
    assert "settle_points" not in moves.meta and moves.meta["settle_first"] == list(first)
    assert meter.meets(moves.choices()) and _settled(meter, moves.choices())
    with pytest.raises(RlMtdError, match="settle_by"):
        sensitivity_policy(tiny_proxy, 6, study=study, settle_by="nope")
