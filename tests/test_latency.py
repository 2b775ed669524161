"""Tests for the per-layer latency model and the latency budget (rl_mtd.latency)."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import FakeTimer
from torch import nn

from rl_mtd.budget import DEFAULT_LEVELS, Budget, BudgetMeter, settle
from rl_mtd.budget_table import BudgetTable
from rl_mtd.decompose import METHODS, conv_layers, rank_for_ratio
from rl_mtd.errors import RlMtdError
from rl_mtd.latency import LatencyModel, layer_block
from rl_mtd.metrics import count_macs
from rl_mtd.models import build_vgg
from rl_mtd.policy import Policy, apply_policy

NET, WIDTH = "vgg11", 0.125


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return build_vgg(NET, width=WIDTH).eval()


@pytest.fixture(scope="module")
def latency(model) -> LatencyModel:
    return LatencyModel(model, batch_size=4, timer=FakeTimer())


def test_layer_block_is_the_conv_with_its_batchnorm_and_relu(model):
    name = "features.0"
    block = layer_block(model, name, model.get_submodule(name))
    assert [type(m) for m in block] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]


def _grid_policies(model, n: int, seed: int) -> list[Policy]:
    """Random mixed policies whose every layer is at a grid level (timed, not interpolated):
    keep, or Tucker-2 or CP at 2x, 4x or 8x."""
    rng = np.random.default_rng(seed)
    options = [("keep", None)] + [(m, t) for m in METHODS[1:] for t in (2.0, 4.0, 8.0)]
    out = []
    for _ in range(n):
        picks = [options[int(rng.integers(len(options)))] for _ in conv_layers(model)]
        choices = [
            (m, None if m == "keep" else rank_for_ratio(c, m, t))
            for (m, t), (_, c) in zip(picks, conv_layers(model), strict=True)
        ]
        out.append(Policy.from_choices(model, choices, net=NET, width=WIDTH))
    return out


def test_prediction_is_exact_for_an_additive_timer(model, latency):
    """With a timer whose cost adds up over layers the sum of the layers is the whole model."""
    timer = FakeTimer()
    assert latency.predict([("keep", None)] * len(latency.convs)) == pytest.approx(
        latency.original_ms
    )
    assert latency.keep_scale == pytest.approx(1.0)
    for policy in _grid_policies(model, 4, seed=3):
        built = apply_policy(model, policy, factorize=False)
        measured = timer(built, (4, 3, 32, 32))
        assert latency.predict(policy.choices()) == pytest.approx(measured, rel=1e-9)
        assert latency.speedup(policy.choices()) == pytest.approx(latency.original_ms / measured)


class CacheBound(FakeTimer):
    """Inside a whole net each layer also pays 1e-5 ms per weight byte it
    holds beyond ``cache`` bytes, as on a CPU where large weights leave the cache between passes;
    alone (in a timing loop) it does not."""

    def __init__(self, cache: int) -> None:
        super().__init__()
        self.cache = cache

    def __call__(self, module, shape):
        ms = super().__call__(module, shape)
        if not hasattr(module, "features"):  # a layer alone
            return ms
        for layer in module.features:
            if not isinstance(layer, nn.BatchNorm2d | nn.ReLU | nn.MaxPool2d):
                weights = 4 * sum(p.numel() for p in layer.parameters())
                ms += 1e-5 * max(0, weights - self.cache)
        return ms


def test_weights_beyond_the_cache_are_charged_to_every_layer_that_has_them(model):
    """At batch 1 on a CPU a layer runs slower inside the net than alone when its weights do not
    fit the cache: the model charges that per byte beyond it, to kept layers and decomposed
    blocks alike, and then predicts such a timer exactly; scaling the kept layers instead (what
    it does when no layer exceeds the cache) misprices decomposed blocks with large factors."""
    sizes = sorted(4 * sum(p.numel() for p in c.parameters()) for _, c in conv_layers(model))
    cache = sizes[len(sizes) // 2]  # half the layers exceed it
    timer = CacheBound(cache)
    aware = LatencyModel(model, batch_size=1, timer=timer, cache=cache)
    scaled = LatencyModel(model, batch_size=1, timer=CacheBound(cache), cache=10**12)
    assert aware.keep_scale == 1.0 and aware.per_byte_ms == pytest.approx(1e-5)
    assert scaled.per_byte_ms == 0.0 and scaled.keep_scale > 1.0
    worst_scaled = 0.0
    policies = [
        Policy.from_choices(  # every layer at one grid level: timed, not interpolated
            model,
            [(m, rank_for_ratio(c, m, t)) for _, c in conv_layers(model)],
            net=NET,
            width=WIDTH,
        )
        for m in METHODS[1:]
        for t in (2.0, 4.0)
    ]
    policies += _grid_policies(model, 4, seed=5)
    for policy in policies:
        measured = timer(apply_policy(model, policy, factorize=False), (1, 3, 32, 32))
        assert aware.predict(policy.choices()) == pytest.approx(measured, rel=1e-9)
        worst_scaled = max(worst_scaled, abs(scaled.predict(policy.choices()) / measured - 1))
    assert worst_scaled > 0.05


def test_the_original_is_predicted_as_measured_when_the_net_runs_faster_than_its_layers(model):
    """No weight byte is charged then (it would only add time): the kept layers are scaled."""

    class Overlapping(FakeTimer):
        def __call__(self, module, shape):
            ms = super().__call__(module, shape)
            return 0.9 * ms if hasattr(module, "features") else ms

    lm = LatencyModel(model, batch_size=1, timer=Overlapping(), cache=0)
    assert lm.per_byte_ms == 0.0 and lm.keep_scale < 1.0
    assert lm.speedup([("keep", None)] * len(lm.convs)) == pytest.approx(1.0)


def test_the_cache_size_is_read_from_sysfs_and_unknown_without_it(tmp_path, monkeypatch):
    import rl_mtd.latency as latency_module
    import rl_mtd.timing as timing

    for index, (level, kind, size) in enumerate([(1, "Data", "48K"), (2, "Unified", "1024K")]):
        folder = tmp_path / f"index{index}"
        folder.mkdir()
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (folder / name).write_text(f"{value}\n")
    monkeypatch.setattr(timing, "SYSFS_CACHES", tmp_path)
    assert latency_module.cache_bytes("cpu") == 1024 * 1024
    (tmp_path / "index1" / "size").write_text("2M\n")
    assert latency_module.cache_bytes("cpu") == 2 * 1024 * 1024
    monkeypatch.setattr(timing, "SYSFS_CACHES", tmp_path / "absent")
    assert latency_module.cache_bytes("cpu") is None
    lm = LatencyModel(build_vgg(NET, width=WIDTH).eval(), batch_size=1, timer=FakeTimer())
    assert lm.cache is None and lm.per_byte_ms == 0.0 and "an unknown cache" in lm.describe()


def test_measurements_are_kept_between_runs_and_a_bad_file_is_not_trusted(model, tmp_path):
    path = tmp_path / "latency.json"
    first = FakeTimer()
    a = LatencyModel(model, batch_size=2, timer=first, path=path)
    assert path.exists() and first.calls > 0
    again = FakeTimer()
    b = LatencyModel(model, batch_size=2, timer=again, path=path)
    assert again.calls == 0, "everything the first run measured is read back"
    assert (b.original_ms, b.rest_ms, b.keep_scale) == (a.original_ms, a.rest_ms, a.keep_scale)
    assert b.seconds == a.seconds > 0, "what the timing cost is read back too: a search pays it"
    b.layer_ms("features.4", "cp", 3)
    assert b.seconds > a.seconds, "timing the grid adds its cost"
    grid_calls = again.calls
    assert grid_calls > 1, "the layer's whole CP grid is timed when first asked for"
    b.layer_ms("features.4", "cp", 5)
    assert again.calls == grid_calls, "other ranks of that layer are on the grid or between"
    b.save()
    assert any(k.startswith("features.4|cp|") for k in json.loads(path.read_text())["layers"])
    other = FakeTimer()
    LatencyModel(model, batch_size=8, timer=other, path=path)
    assert other.calls > 0, "another batch size is measured afresh"
    path.write_text("{not json")
    damaged = FakeTimer()
    LatencyModel(model, batch_size=2, timer=damaged, path=path)
    assert damaged.calls > 0 and json.loads(path.read_text())["key"]["batch_size"] == 2


def test_a_rank_off_the_grid_is_interpolated_in_its_parameters(model, latency):
    from rl_mtd.decompose import conv_layers, decomposed_params, rank_for_ratio

    name, conv = conv_layers(model)[3]
    lo, hi = rank_for_ratio(conv, "cp", 8.0), rank_for_ratio(conv, "cp", 4.0)
    assert hi - lo >= 2
    mid = (lo + hi) // 2
    t_lo, t_hi = latency.layer_ms(name, "cp", lo), latency.layer_ms(name, "cp", hi)
    p_lo, p_hi, p_mid = (decomposed_params(conv, "cp", r) for r in (lo, hi, mid))
    expected = t_lo + (t_hi - t_lo) * (p_mid - p_lo) / (p_hi - p_lo)
    assert latency.layer_ms(name, "cp", mid) == pytest.approx(expected)
    assert t_lo < latency.layer_ms(name, "cp", mid) < t_hi


def test_bad_settings_are_refused(model):
    with pytest.raises(RlMtdError, match="latency model"):
        Budget(latency=2.0)
    with pytest.raises(RlMtdError, match="batch size"):
        LatencyModel(model, batch_size=0, timer=FakeTimer())
    with pytest.raises(RlMtdError, match="target speed-up"):
        Budget(latency=0.5, latency_model=object())


def _random_walks(table: BudgetTable, budget: Budget, n: int) -> list[list[tuple[int, int]]]:
    """``n`` policies of uniformly drawn options, each layer's through the wall (seeded)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        choices: list[tuple[int, int]] = []
        for _layer in table.layers:
            draw = (int(rng.integers(len(METHODS))), int(rng.integers(len(DEFAULT_LEVELS))))
            choices.append(table.wall(choices, draw, budget))
        out.append(choices)
    return out


@pytest.mark.parametrize("params, speedup", [(None, 2.0), (4.0, 2.5), (8.0, 1.5)])
def test_the_wall_and_settling_hold_a_latency_budget(model, latency, params, speedup):
    budget = Budget(params=params, latency=speedup, latency_model=latency)
    table = BudgetTable(model, METHODS, DEFAULT_LEVELS)
    table.check_target(budget)
    meter = BudgetMeter(model, budget)
    for choices in _random_walks(table, budget, 30):
        picked = table.to_choices(choices)
        assert latency.speedup(picked) >= speedup * (1 - 1e-9)
        settled = settle(meter, picked)
        assert meter.meets(settled) and latency.speedup(settled) >= speedup * (1 - 1e-9)
        if params is not None:
            assert meter.params_original / meter.params(settled) >= params
    assert "faster (predicted)" in meter.describe(picked)


def test_a_latency_target_beyond_reach_is_refused(model, latency):
    table = BudgetTable(model, METHODS, DEFAULT_LEVELS)
    with pytest.raises(RlMtdError, match="--target-latency"):
        table.check_target(Budget(latency=1e4, latency_model=latency))


def test_the_default_timer_measures_the_inference_form(model):
    """The real timer on this machine: positive times, and the original predicted as measured."""
    real = LatencyModel(model, batch_size=2)
    keep = [("keep", None)] * len(real.convs)
    assert real.original_ms > 0 and real.rest_ms >= 0 and real.keep_scale > 0
    assert real.predict(keep) == pytest.approx(real.original_ms)
    assert real.layer_ms("features.4", "tucker2", (4, 4)) > 0
    assert "batch 2" in real.describe()


def test_timings_taken_on_a_busy_machine_are_not_cached(model, tmp_path, monkeypatch, caplog):
    import rl_mtd.latency as latency_module

    class SlowTimer(FakeTimer):
        def __call__(self, module, shape):
            time.sleep(0.005)  # long enough for the busy check to judge
            return super().__call__(module, shape)

    # The busy check judges the module's own timer only: stand a slow fake in for it.
    monkeypatch.setattr(latency_module, "measured_timer", lambda *a, **k: SlowTimer())
    monkeypatch.setattr(latency_module, "others_cpu_share", lambda before, seconds: 0.8)
    path = tmp_path / "busy.json"
    with caplog.at_level("WARNING", logger="rl_mtd"):
        busy = LatencyModel(model, batch_size=2, path=path)
    assert busy.busy == 0.8 and "80%" in busy.describe()
    assert not path.exists() and "not trustworthy" in caplog.text
    monkeypatch.setattr(latency_module, "others_cpu_share", lambda before, seconds: 0.0)
    LatencyModel(model, batch_size=2, path=path)
    assert path.exists(), "an idle machine's timings are kept"
    monkeypatch.setattr(latency_module, "others_cpu_share", lambda before, seconds: 0.8)
    LatencyModel(model, batch_size=3, timer=SlowTimer(), path=tmp_path / "own.json")
    assert (tmp_path / "own.json").exists(), "a caller's own timer is not judged"


def test_one_latency_model_per_net_width_batch_and_device(monkeypatch):
    """compare.py scores each strategy through its own proxy: all must hold the same budget,
    so a run's latency model is one per architecture (timing does not depend on weights)."""
    import rl_mtd.latency as latency_module
    from agents.config import RunConfig
    from agents.inputs import latency_model

    monkeypatch.setattr(latency_module, "measured_timer", lambda *a, **k: FakeTimer())
    cfg = RunConfig(net=NET, width=WIDTH, target_latency=2.0, latency_batch=4)
    first = latency_model(cfg, "cpu")
    assert first is latency_model(replace(cfg, target_latency=3.0), torch.device("cpu"))
    assert first.batch_size == 4
    other = latency_model(replace(cfg, latency_batch=2), "cpu")
    assert other is not first and other.batch_size == 2
    assert latency_model(replace(cfg, width=2 * WIDTH), "cpu") is not first
    assert latency_model(RunConfig(net=NET, width=WIDTH), "cpu") is None


def test_the_wall_holds_parameters_and_latency_together_when_keeping_is_fastest(model):
    """With a large cost per conv call a kept layer is the fastest option and a decomposed one
    the smallest: the wall must not count on later layers being both (28 of 200 random walks
    ended over budget before it took one option per later layer for every limit)."""

    class CallBound(FakeTimer):
        def __call__(self, module, shape):
            self.calls += 1
            convs = sum(isinstance(m, nn.Conv2d) for m in module.modules())
            return 1e-6 * shape[0] * count_macs(module, (1, *shape[1:])) + 0.05 * convs

    latency = LatencyModel(model, batch_size=1, timer=CallBound())
    table = BudgetTable(model, METHODS, DEFAULT_LEVELS)
    budget = Budget(params=32.0, latency=2.0, latency_model=latency)
    table.check_target(budget)
    meter = BudgetMeter(model, budget)
    for choices in _random_walks(table, budget, 200):
        assert meter.meets(table.to_choices(choices)), meter.describe(table.to_choices(choices))


def test_blocks_timed_after_construction_are_judged_before_they_are_cached(
    model, tmp_path, monkeypatch
):
    import rl_mtd.latency as latency_module

    class SlowTimer(FakeTimer):
        def __call__(self, module, shape):
            time.sleep(0.01)  # the CP grid's seven blocks: long enough to judge
            return super().__call__(module, shape)

    monkeypatch.setattr(latency_module, "measured_timer", lambda *a, **k: SlowTimer())
    monkeypatch.setattr(latency_module, "others_cpu_share", lambda before, seconds: 0.0)
    path = tmp_path / "later.json"
    lm = LatencyModel(model, batch_size=2, path=path)
    assert path.exists()
    monkeypatch.setattr(latency_module, "others_cpu_share", lambda before, seconds: 0.9)
    lm.layer_ms("features.4", "cp", 3)  # the layer's CP grid, timed on a busy machine
    lm.save()
    saved = json.loads(path.read_text())["layers"]
    assert not any(k.startswith("features.4|cp|") for k in saved), "busy timings not cached"
