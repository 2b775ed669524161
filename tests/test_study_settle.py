"""Tests for the study-guided settle (rl_mtd.baselines.study_settle) and the heuristic's
``settle_by="study"``."""

from __future__ import annotations

import math

import pytest
from torch import nn

from rl_mtd.baselines import SensitivityStudy, sensitivity_policy
from rl_mtd.baselines.study_settle import accuracy_curves, study_settle
from rl_mtd.budget import Budget, BudgetMeter, settle
from rl_mtd.budget_table import BudgetTable
from rl_mtd.decompose import next_rank
from rl_mtd.errors import RlMtdError
from rl_mtd.proxy import Proxy

LEVELS = (4, 16, 64)


@pytest.fixture(scope="module")
def model(tiny_baseline) -> nn.Module:
    return tiny_baseline


@pytest.fixture(scope="module")
def proxy(tiny_proxy) -> Proxy:
    return tiny_proxy


def _settled(meter: BudgetMeter, choices) -> bool:
    """No decomposed layer's rank can grow by one step within the budget."""
    for i, (method, rank) in enumerate(choices):
        if method == "keep":
            continue
        bigger = next_rank(meter.convs[i][1], method, rank)
        if bigger is not None and meter.meets([*choices[:i], (method, bigger), *choices[i + 1 :]]):
            return False
    return True


def _curves(n: int, steep: int):
    """Every layer's accuracy flat but ``steep``'s, which rises with its parameters."""
    return {
        (i, m): (lambda p: math.log(p)) if i == steep else (lambda p: 0.5)
        for i in range(n)
        for m in ("tucker2", "cp")
    }


def test_study_settle_gives_the_slack_where_the_study_predicts_the_most_accuracy(model):
    """A layer whose predicted accuracy rises with its rank is raised first, as far as the
    budget allows (what ``settle`` gives a layer named first); the rest of the slack goes to the
    other layers; the result meets the budget and no step more fits."""
    meter = BudgetMeter(model, Budget(4.0))
    n = len(meter.convs)
    start = [("keep", None), *[("tucker2", (2, 2))] * (n - 1)]  # far beyond 4x
    assert meter.meets(start)
    for steep in (1, n - 2):
        out = study_settle(meter, start, _curves(n, steep))
        assert meter.meets(out) and _settled(meter, out)
        first = settle(meter, start, [steep])
        assert out[steep] == first[steep], f"layer {steep} got the slack first"
        assert out[steep] != start[steep]
    assert study_settle(meter, start, _curves(n, 1)) != study_settle(
        meter, start, _curves(n, n - 2)
    )


def test_study_settle_ignores_layers_without_a_curve_and_kept_layers(model):
    meter = BudgetMeter(model, Budget(4.0))
    n = len(meter.convs)
    start = [("keep", None), *[("tucker2", (2, 2))] * (n - 1)]
    out = study_settle(meter, start, {(2, "tucker2"): lambda p: math.log(p)})
    assert out[0] == ("keep", None)
    assert [c for i, c in enumerate(out) if i != 2] == [c for i, c in enumerate(start) if i != 2]
    assert out[2] != start[2] and meter.meets(out)


def test_study_settle_holds_a_macs_limit_too(model):
    meter = BudgetMeter(model, Budget(3.0, macs=3.0))
    n = len(meter.convs)
    start = [("tucker2", (2, 2)) if i else ("tucker2", (2, 1)) for i in range(n)]
    assert meter.meets(start)
    out = study_settle(meter, start, _curves(n, 3))
    assert meter.meets(out) and _settled(meter, out) and out != start


def test_accuracy_curves_pass_through_the_study_and_the_kept_layer(proxy):
    study = SensitivityStudy(proxy, levels=LEVELS)
    table: BudgetTable = study.table
    for key, _ in study.keys():  # an option's accuracy follows its parameters, as in a study
        i, method, level = key
        layer = table.layers[i]
        params = layer.params((table.methods.index(method), table.levels.index(level)))
        study.results[key] = 0.5 + 0.4 * math.log(params) / math.log(layer.original) - 0.01 * i
    base = 0.95
    curves = accuracy_curves(table, study.results, base)
    for (i, method, level), acc in study.results.items():
        layer = table.layers[i]
        opt = (table.methods.index(method), table.levels.index(level))
        assert curves[(i, method)](layer.params(opt)) == pytest.approx(acc)
        assert curves[(i, method)](layer.original) == pytest.approx(base)
        assert curves[(i, method)](1) == pytest.approx(
            min(a for (j, m, _), a in study.results.items() if (j, m) == (i, method))
        ), "flat beyond the strongest option measured"
    i, method = next(iter(curves))
    layer = table.layers[i]
    lo, hi = sorted(layer.params(o) for o in layer.options if table.methods[o[0]] == method)[:2]
    mid = curves[(i, method)](int(math.sqrt(lo * hi)))
    ends = (curves[(i, method)](lo), curves[(i, method)](hi))
    assert min(ends) <= mid <= max(ends), "between two options: between their accuracies"


def test_the_heuristic_settles_by_the_study_when_asked(model, proxy):
    """``settle_by="study"``: the policy meets its target, no step more fits, and it records
    how it settled; an unknown way is refused."""
    study = SensitivityStudy(proxy, levels=LEVELS)
    n = len(study.table.layers)
    sensitive = n - 2
    for key, _ in study.keys():
        i, _, level = key
        study.results[key] = proxy.baseline_acc - (0.02 * math.log2(level) if i == sensitive else 0)
    policy = sensitivity_policy(proxy, 6, study=study, settle_by="study")
    choices = [(c.method, c.rank) for c in policy.layers]
    meter = BudgetMeter(model, Budget(6.0))
    assert meter.meets(choices) and _settled(meter, choices)
    assert policy.meta["settle"] == "study" and "settle_first" not in policy.meta
    with pytest.raises(RlMtdError, match="settle_by"):
        sensitivity_policy(proxy, 6, study=study, settle_by="nope")
