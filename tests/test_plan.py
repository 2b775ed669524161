"""The plan's time estimate: what a proxy evaluation's repair steps cost."""

from __future__ import annotations

import types

import pytest
from torch import nn

import agents.plan as plan
from rl_mtd.proxy import ProxyConfig


def test_repair_step_time_is_the_difference_of_two_repairs(monkeypatch):
    """Each repair costs a fixed 1.0 s plus 0.25 s a step on a fake clock: the estimate is the
    step's 0.25 s, the fixed cost cancelled, and the proxy's own settings are left alone."""
    clock = types.SimpleNamespace(now=0.0)
    config = ProxyConfig(repair_steps=200)

    class FakeProxy:
        def __init__(self) -> None:
            self.config = config

        def repair(self, model: nn.Module) -> None:
            clock.now += 1.0 + 0.25 * self.config.repair_steps

    monkeypatch.setattr(plan.time, "perf_counter", lambda: clock.now)
    proxy = FakeProxy()
    assert plan._repair_step_seconds(proxy, nn.Linear(2, 2)) == pytest.approx(0.25)
    assert proxy.config is config


@pytest.mark.parametrize("slow", [False, True])
def test_a_slow_device_is_timed_in_fewer_repairs_with_the_same_answer(slow, monkeypatch):
    """On a slow device (a full-width VGG16 on a CPU) the repair step is timed from one round of
    2 x less 1 x the probe's steps, no warm-up: fewer repairs, the same 0.25 s on a fake clock."""
    clock = types.SimpleNamespace(now=0.0)
    repairs = []

    class FakeProxy:
        config = ProxyConfig(repair_steps=200)

        def repair(self, model: nn.Module) -> None:
            repairs.append(self.config.repair_steps)
            clock.now += 1.0 + 0.25 * self.config.repair_steps

    monkeypatch.setattr(plan.time, "perf_counter", lambda: clock.now)
    t = plan._repair_step_seconds(FakeProxy(), nn.Linear(2, 2), slow)
    assert t == pytest.approx(0.25)
    steps = plan.PROBE_REPAIR_STEPS
    assert sum(repairs) == (3 * steps if slow else 9 * steps)


def test_a_slow_training_step_is_timed_once(monkeypatch):
    """After the warm-up, one timed step: slower than SLOW_STEP_SECONDS, that is the answer;
    otherwise the faster of two rounds of 4 batches. A fake clock: the warm-up's two steps take
    5 s each (the first steps of a new shape are slow), later steps 2 s."""
    import torch

    from rl_mtd.data import Split

    calls = []
    clock = types.SimpleNamespace(now=0.0)

    def fake_train(model, split, *, config):
        calls.append(config.steps)
        clock.now += (5.0 if len(calls) == 1 else 2.0) * config.steps

    monkeypatch.setattr(plan, "train", fake_train)
    monkeypatch.setattr(plan.time, "perf_counter", lambda: clock.now)
    split = Split(torch.zeros(64, 3, 32, 32, dtype=torch.uint8), torch.zeros(64, dtype=torch.long))
    assert plan._time_train_step(nn.Linear(2, 2), split, 8) == pytest.approx(2.0)
    assert calls == [2, 1]
    monkeypatch.setattr(plan, "SLOW_STEP_SECONDS", 10.0)  # the same device counted fast
    calls.clear()
    assert plan._time_train_step(nn.Linear(2, 2), split, 8) == pytest.approx(2.0)
    assert calls == [2, 1, 4, 4]


def test_the_plan_counts_what_an_interrupted_baseline_training_did(caplog):
    """A baseline saved half-way (Ctrl-C) is planned as the half left, and the plan says so."""
    import torch

    from agents.config import RunConfig

    cfg = RunConfig(baseline_epochs=10, batch_size=100, episodes=1, warm_start="none")
    splits = types.SimpleNamespace(train=range(1000), proxy=range(10), test=range(10))
    timing = plan.Timing(step_seconds=0.5, episode_seconds=1.0, n_layers=8)
    estimates = []
    for done in (None, 0.5):
        caplog.clear()
        with caplog.at_level("INFO"):
            est = plan.print_plan(
                cfg, splits, torch.device("cpu"), timing, True, None, baseline_done=done
            )
        estimates.append(est["baseline"])
    assert estimates == [pytest.approx(50.0), pytest.approx(25.0)]  # 10 epochs x 10 steps x 0.5 s
    assert "1. baseline: train 10 epochs, going on from 50%" in caplog.text


def test_a_study_with_fewer_repair_steps_is_planned_cheaper():
    """--study-repair-steps: each study entry costs the search's evaluation less the repair
    steps it skips."""
    import torch

    from agents.config import RunConfig

    splits = types.SimpleNamespace(train=range(1000), proxy=range(10), test=range(10))
    timing = plan.Timing(
        step_seconds=0.5, episode_seconds=3.0, n_layers=8, repair_step_seconds=0.01
    )
    studies = []
    # unset: STUDY_REPAIR_STEPS (50), or the search's own steps where those are fewer
    for steps, repair in ((200, 200), (100, 200), (0, 200), (None, 200), (None, 40)):
        cfg = RunConfig(
            episodes=1, warm_start="sensitivity", repair_steps=repair, study_repair_steps=steps
        )
        assert cfg.study_steps == (steps if steps is not None else min(repair, 50))
        est = plan.print_plan(cfg, splits, torch.device("cpu"), timing, False, None)
        studies.append(est["study"])
    entries = 8 * 2 * 6  # layers x decomposed methods x the study's levels
    assert studies == [
        pytest.approx(entries * 3.0),
        pytest.approx(entries * 2.0),
        pytest.approx(entries * 1.0),
        pytest.approx(entries * 1.5),
        pytest.approx(entries * 3.0),
    ]


@pytest.mark.parametrize("episodes, n_envs, planned", [(5, 1, 5), (5, 2, 6), (6, 4, 8)])
def test_the_plan_counts_episodes_in_whole_rounds_of_the_envs(episodes, n_envs, planned, caplog):
    """--n-envs N: the envs finish their fixed-length episodes on the same step, so the search
    stops after a whole round (5 episodes on 2 envs ran 6)."""
    import logging

    import torch

    from agents.config import RunConfig

    splits = types.SimpleNamespace(train=range(1000), proxy=range(10), test=range(10))
    timing = plan.Timing(step_seconds=0.5, episode_seconds=3.0, n_layers=8, repair_step_seconds=0)
    cfg = RunConfig(episodes=episodes, n_envs=n_envs)
    with caplog.at_level(logging.INFO, logger="rl_mtd"):
        est = plan.print_plan(cfg, splits, torch.device("cpu"), timing, False, None)
    assert est["search"] == pytest.approx(planned * 3.0)
    assert f"{planned} episodes x 8 layers" in caplog.text


def test_the_plan_says_when_the_final_check_keeps_the_heuristic_unless_beaten(caplog):
    import torch

    from agents.config import RunConfig

    splits = types.SimpleNamespace(train=range(1000), proxy=range(10), test=range(10))
    timing = plan.Timing(step_seconds=0.5, episode_seconds=1.0, n_layers=8)
    said = "kept unless beaten by more than 2 paired standard errors"
    for warm, margin, shown in (
        ("sensitivity", 2.0, True),
        ("sensitivity", 0.0, False),
        ("none", 2.0, False),
    ):
        cfg = RunConfig(
            episodes=3,
            target_ratio=8.0,
            warm_start=warm,
            final_check=2,
            final_check_margin=margin,
        )
        caplog.clear()
        with caplog.at_level("INFO"):
            plan.print_plan(cfg, splits, torch.device("cpu"), timing, False, None)
        assert "then the final check: the 2 best policies" in caplog.text
        assert (said in caplog.text) == shown


def test_the_study_is_planned_by_its_evaluations_and_its_factorising(caplog):
    """The study's estimate: its distinct evaluations (levels sharing a rank share one) at the
    study's cost each, plus factorising their options, which the plan names."""
    import torch

    from agents.config import RunConfig

    splits = types.SimpleNamespace(train=range(1000), proxy=range(10), test=range(10))
    timing = plan.Timing(
        step_seconds=0.5,
        episode_seconds=3.0,
        n_layers=8,
        study_evals=50,
        study_factor_seconds=60.0,
    )
    cfg = RunConfig(episodes=1, warm_start="sensitivity", repair_steps=50)
    with caplog.at_level("INFO"):
        est = plan.print_plan(cfg, splits, torch.device("cpu"), timing, False, None)
    assert est["study"] == pytest.approx(50 * 3.0 + 60.0)
    assert "up to 50 proxy evaluations" in caplog.text
    assert "of which ~60 s factorising" in caplog.text
    # Without a study (no warm start, no study observation) neither is charged.
    cfg = RunConfig(episodes=1, warm_start="none", observe="layer")
    assert plan.print_plan(cfg, splits, torch.device("cpu"), timing, False, None)["study"] == 0


def test_a_fit_unit_is_read_off_the_line_through_two_timed_ones():
    """a + b x work through (100, 1 s) and (300, 2 s); one point, or a falling line (timing
    noise), scales the nearer point in proportion."""
    line = [(100.0, 1.0), (300.0, 2.0)]
    assert plan._unit_seconds(line, 500.0) == pytest.approx(3.0)
    assert plan._unit_seconds(line, 100.0) == pytest.approx(1.0)
    assert plan._unit_seconds([(100.0, 1.0)], 400.0) == pytest.approx(4.0)
    falling = [(100.0, 1.0), (300.0, 0.5)]
    assert plan._unit_seconds(falling, 250.0) == pytest.approx(0.5 * 250 / 300)


def test_the_study_cost_sums_every_distinct_option_on_a_timed_line(monkeypatch):
    """On a width-0.125 VGG11 with a fake clock (a unit costs 1 ms + 1 ns per multiply-add), the
    estimate is the sum over the study's distinct options of units x that, each CP fit at its
    sweep cap; the evaluations are the study's own entries less those sharing a rank."""
    from rl_mtd.baselines import SENSITIVITY_LEVELS
    from rl_mtd.baselines.sensitivity import study_entries
    from rl_mtd.budget_table import BudgetTable
    from rl_mtd.decompose import DECOMPOSED, conv_layers
    from rl_mtd.factorize import default_max_iter, sweep_work
    from rl_mtd.models import build_vgg

    timed = []

    def fake_time_fit(weight, method, rank):
        timed.append(method)
        return 1e-3 + 1e-9 * plan._fit_work(weight, method, rank)[1]

    monkeypatch.setattr(plan, "_time_fit", fake_time_fit)
    model = build_vgg("vgg11", width=0.125)
    evals, seconds = plan._study_cost(model)
    convs = [c for _, c in conv_layers(model)]
    entries = study_entries(BudgetTable(model, DECOMPOSED, SENSITIVITY_LEVELS))
    distinct = {(i, m, r) for (i, m, _), r in entries}
    assert evals == len(distinct) < len(entries)  # the first layer's levels share ranks
    expected = 0.0
    for i, method, rank in distinct:
        shape = tuple(convs[i].weight.shape)
        if method == "cp":
            expected += default_max_iter(shape, rank) * (1e-3 + 1e-9 * sweep_work(shape, rank))
        else:
            expected += 1e-3 + 1e-9 * convs[i].weight.numel() * sum(rank)
    assert seconds == pytest.approx(expected)
    assert sorted(timed) == ["cp", "cp", "tucker2", "tucker2"]  # two calibration fits each


@pytest.mark.parametrize("method, rank", [("cp", 4), ("tucker2", (4, 4))])
def test_a_calibration_fit_is_timed_for_real(method, rank):
    import torch

    torch.manual_seed(0)
    assert 0 < plan._time_fit(torch.randn(16, 8, 3, 3), method, rank) < 5.0
