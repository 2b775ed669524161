"""Tests for the baseline strategies (rl_mtd.baselines)."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rl_mtd.baselines import (
    DEFAULT_LEVELS,
    STRATEGIES,
    SensitivityStudy,
    random_policies,
    random_search,
    sensitivity_policy,
    strategy_policy,
    uniform_policy,
    vbmf_policy,
    vbmf_ranks,
)
from rl_mtd.baselines.uniform import _vbmf_choices
from rl_mtd.budget import DEFAULT_LEVELS as BUDGET_LEVELS
from rl_mtd.budget import Budget
from rl_mtd.data import Split
from rl_mtd.decompose import (
    FactorCache,
    conv_layers,
    decomposed_params,
    layer_params,
    next_rank,
    rank_for_ratio,
)
from rl_mtd.errors import RlMtdError
from rl_mtd.metrics import count_macs, count_params
from rl_mtd.models import build_vgg
from rl_mtd.policy import Policy, apply_policy
from rl_mtd.proxy import Proxy

WIDTH = 0.125
NET = "vgg11"
STUDY_LEVELS = (4, 16, 64)  # fewer than the default, to keep the study to a few seconds
N_RANDOM = 4


@pytest.fixture(scope="module")
def model(tiny_baseline) -> nn.Module:
    """The suite's trained width-0.125 VGG11 (shared: nothing here changes it)."""
    return tiny_baseline


@pytest.fixture(scope="module")
def proxy(tiny_proxy) -> Proxy:
    return tiny_proxy


@pytest.fixture(scope="module")
def study(proxy) -> SensitivityStudy:
    return SensitivityStudy(proxy, methods=("tucker2", "cp"), levels=STUDY_LEVELS)


def test_ctrl_c_saves_the_study_up_to_its_last_result_not_its_last_timed_save(proxy, monkeypatch):
    """The study saves every STUDY_SAVE_EVERY_S; Ctrl-C between two saves writes what was
    measured since, so nothing measured is lost (a resumed run measures only the rest)."""
    import agents.studies as studies

    monkeypatch.setattr(studies, "STUDY_SAVE_EVERY_S", 1e9)  # no timed save in this test
    real, calls = proxy.evaluate, []

    def evaluate(policy):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(policy.choices())
        return real(policy)

    monkeypatch.setattr(proxy, "evaluate", evaluate)
    with pytest.raises(KeyboardInterrupt):
        studies.cached_study(proxy)
    path = studies.study_path(proxy, SensitivityStudy(proxy))
    assert len(json.loads(path.read_text())["rows"]) >= 3


def test_an_interrupted_study_keeps_what_it_measured(proxy, monkeypatch):
    """Ctrl-C in the sensitivity study (minutes on a CPU) loses nothing already measured:
    the cache file holds the partial study and the next one measures only the rest."""
    import agents.studies as studies

    monkeypatch.setattr(studies, "STUDY_SAVE_EVERY_S", 0.0)
    real, calls = proxy.evaluate, []

    def interrupted_after(n):
        def evaluate(policy):
            if len(calls) == n:
                raise KeyboardInterrupt
            calls.append(policy.choices())
            return real(policy)

        return evaluate

    monkeypatch.setattr(proxy, "evaluate", interrupted_after(3))
    with pytest.raises(KeyboardInterrupt):
        studies.cached_study(proxy)
    path = studies.study_path(proxy, SensitivityStudy(proxy))
    saved = len(json.loads(path.read_text())["rows"])  # levels that share a rank share a row
    assert saved >= 3
    first = list(calls)
    monkeypatch.setattr(proxy, "evaluate", interrupted_after(5))
    progress: list[tuple[int, int]] = []
    with pytest.raises(KeyboardInterrupt):
        studies.cached_study(proxy, on_progress=lambda done, total: progress.append((done, total)))
    assert calls[3:] and not set(map(str, calls[3:])) & set(map(str, first)), "nothing twice"
    assert len(json.loads(path.read_text())["rows"]) > saved
    # A progress bar follows it: done counts up from what was cached, out of the whole study.
    done, totals = [d for d, _ in progress], {t for _, t in progress}
    assert done == sorted(done) and done[0] > saved and len(totals) == 1 and totals.pop() > done[-1]


def test_a_study_is_kept_per_dataset_not_only_per_checkpoint(model, proxy, tiny_splits):
    """The same baseline scored on other images (another --data of the same sizes, or another
    draw of the proxy split) must not reuse a study measured on the first."""
    import agents.studies as studies

    study = SensitivityStudy(proxy)
    flipped = Split(tiny_splits.proxy.x.flip(-1), tiny_splits.proxy.y)
    other = Proxy(
        model, train_split=tiny_splits.train, proxy_split=flipped, device="cpu", cache=proxy.cache
    )
    same = Proxy(
        model,
        train_split=tiny_splits.train,
        proxy_split=tiny_splits.proxy,
        device="cpu",
        cache=proxy.cache,
    )
    assert studies.study_path(same, study) == studies.study_path(proxy, study)
    assert studies.study_path(other, study) != studies.study_path(proxy, study)
    # the same kernels with another head (or BatchNorm) score otherwise: another study
    head = copy.deepcopy(model)
    with torch.no_grad():
        next(m for m in head.modules() if isinstance(m, nn.Linear)).bias.add_(1.0)
    reheaded = Proxy(
        head, train_split=tiny_splits.train, proxy_split=tiny_splits.proxy, device="cpu"
    )
    assert reheaded.wkeys == proxy.wkeys
    assert studies.study_path(reheaded, study) != studies.study_path(proxy, study)


def _ratio(model: nn.Module, policy: Policy) -> float:
    return count_params(model) / policy.predicted_params(model)


def _policy(name: str, proxy: Proxy, study: SensitivityStudy, target: float) -> Policy:
    return strategy_policy(name, proxy, target, n_random=N_RANDOM, study=study)


# ----------------------------------------------------------------------------- every strategy


@pytest.mark.parametrize("target", [4, 8])
@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_returns_valid_policy_reaching_target(name, target, model, proxy, study):
    policy = _policy(name, proxy, study, target)
    assert len(policy.layers) == len(conv_layers(model))
    assert (policy.net, policy.width, policy.num_classes) == (NET, WIDTH, 10)
    assert policy.meta["strategy"] == name
    assert policy.meta["target_ratio"] == target
    assert any(c.method != "keep" for c in policy.layers)
    # JSON round trip gives the same policy.
    again = Policy.from_dict(json.loads(json.dumps(policy.to_dict())))
    assert again == policy
    # Reaches the target, counted on the whole model, and the prediction is exact.
    assert policy.predicted_params(model) <= count_params(model) / target
    assert _ratio(model, policy) >= target
    built = apply_policy(model, policy, factorize=False)
    assert count_params(built) == policy.predicted_params(model)


@pytest.mark.parametrize("params, macs", [(None, 3.0), (4.0, 3.0)])
@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_meets_a_macs_budget(name, params, macs, model, proxy, study):
    """Every strategy accepts a MACs limit, alone or with a parameter limit, and meets both."""
    budget = Budget(params=params, macs=macs)
    policy = strategy_policy(name, proxy, budget, n_random=N_RANDOM, study=study)
    built = apply_policy(model, policy, factorize=False)
    assert count_macs(model) / count_macs(built) >= macs
    if params is not None:
        assert count_params(model) / count_params(built) >= params
    assert policy.meta["target_macs"] == macs and policy.meta["target_ratio"] == params


@pytest.fixture(scope="module")
def latency(model):
    """A latency model of the suite's net with a deterministic additive timer."""
    from conftest import FakeTimer

    from rl_mtd.latency import LatencyModel

    return LatencyModel(model, batch_size=4, timer=FakeTimer())


@pytest.mark.parametrize("params, speedup", [(None, 2.0), (4.0, 2.0)])
@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_meets_a_latency_budget(name, params, speedup, model, proxy, study, latency):
    """Every strategy accepts a predicted-latency limit, alone or with a parameter limit."""
    budget = Budget(params=params, latency=speedup, latency_model=latency)
    policy = strategy_policy(name, proxy, budget, n_random=N_RANDOM, study=study)
    choices = policy.choices()
    assert latency.speedup(choices) >= speedup * (1 - 1e-9)
    if params is not None:
        assert _ratio(model, policy) >= params
    assert policy.meta["target_latency"] == speedup and policy.meta["latency_batch"] == 4


@pytest.mark.parametrize("name", STRATEGIES)
def test_unreachable_target_raises(name, proxy, study):
    before = proxy.evaluations
    with pytest.raises(RlMtdError, match="cannot be reached|beyond what"):
        _policy(name, proxy, study, 1e5)
    with pytest.raises(RlMtdError, match="cannot be reached|beyond what"):
        _policy(name, proxy, study, Budget(params=2.0, macs=1e5))
    assert proxy.evaluations == before  # found out before any evaluation


@pytest.mark.parametrize("bad", [0, -2, math.nan, math.inf])
def test_bad_target_raises(bad, proxy, study):
    with pytest.raises(RlMtdError, match="target ratio"):
        _policy("tucker2", proxy, study, bad)


def test_unknown_strategy_raises(proxy):
    with pytest.raises(RlMtdError, match="unknown strategy 'svd'"):
        strategy_policy("svd", proxy, 4)
    with pytest.raises(RlMtdError, match="Did you mean 'tucker2'"):
        strategy_policy("tucker", proxy, 4)


# ----------------------------------------------------------------------------- uniform


@pytest.mark.parametrize("target", [4, 8])
@pytest.mark.parametrize("method", ["tucker2", "cp"])
def test_uniform_is_one_method_one_ratio_settled_at_the_target(method, target, model):
    policy = uniform_policy(model, method, target, net=NET, width=WIDTH)
    assert {c.method for c in policy.layers} <= {method, "keep"}
    # The big layers are all decomposed; only a too-small layer may be kept.
    assert all(c.method == method for c in policy.layers[1:])
    ratio = _ratio(model, policy)
    assert target <= ratio < 1.25 * target
    _assert_settled(model, policy, target)
    # The shared ratio is the smallest that works: a slightly smaller one misses the target;
    # settling only raises ranks above it.
    r = policy.meta["layer_ratio"]
    choices = []
    for (_, conv), choice in zip(conv_layers(model), policy.layers):
        rank = rank_for_ratio(conv, method, r)
        assert choice.method == "keep" or _rank_size(choice.rank) >= _rank_size(rank)
        smaller = rank_for_ratio(conv, method, r * 0.999)
        kept = decomposed_params(conv, method, smaller) >= layer_params(conv)
        choices.append(("keep", None) if kept else (method, smaller))
    looser = Policy.from_choices(model, choices, net=NET, width=WIDTH)
    assert _ratio(model, looser) < target


def _assert_settled(model: nn.Module, policy: Policy, target: float) -> None:
    """At the target: no decomposed layer's rank can grow by a step within the budget."""
    choices = [(c.method, c.rank) for c in policy.layers]
    for i, ((_, conv), (m, rank)) in enumerate(zip(conv_layers(model), choices)):
        bigger = next_rank(conv, m, rank) if m != "keep" else None
        if bigger is not None:
            grown = Policy.from_choices(
                model, [*choices[:i], (m, bigger), *choices[i + 1 :]], net=NET, width=WIDTH
            )
            assert _ratio(model, grown) < target, f"layer {i} could take a bigger rank"


def _rank_size(rank) -> int:
    return rank[0] * rank[1] if isinstance(rank, tuple | list) else rank


def test_uniform_rejects_keep(model):
    with pytest.raises(RlMtdError, match="tucker2"):
        uniform_policy(model, "keep", 4, net=NET, width=WIDTH)


# ----------------------------------------------------------------------------- VBMF


def _low_rank_conv(o: int, i: int, ranks: tuple[int, int], noise: float, seed: int) -> nn.Conv2d:
    """A conv whose kernel has multilinear ranks ``ranks`` on its channel modes, plus noise."""
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(ranks[0], ranks[1], 3, 3, generator=g, dtype=torch.float64)
    u_out, _ = torch.linalg.qr(torch.randn(o, ranks[0], generator=g, dtype=torch.float64))
    u_in, _ = torch.linalg.qr(torch.randn(i, ranks[1], generator=g, dtype=torch.float64))
    w = torch.einsum("abhw,oa,ib->oihw", core, u_out, u_in)
    w = w + noise * w.std() * torch.randn(w.shape, generator=g, dtype=torch.float64)
    conv = nn.Conv2d(i, o, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(w.float())
    return conv


@pytest.mark.parametrize(
    "o,i,ranks,seed",
    [(32, 24, (5, 3), 0), (64, 64, (12, 20), 1), (16, 48, (9, 4), 2)],
)
def test_vbmf_ranks_recover_known_multilinear_rank(o, i, ranks, seed):
    conv = _low_rank_conv(o, i, ranks, noise=0.02, seed=seed)
    assert vbmf_ranks(conv) == ranks


def test_vbmf_ranks_are_at_least_one_and_at_most_channels(model):
    for _, conv in conv_layers(model):
        r_out, r_in = vbmf_ranks(conv)
        assert 1 <= r_out <= conv.out_channels and 1 <= r_in <= conv.in_channels


@pytest.mark.parametrize("target", [4, 8])
def test_vbmf_scale_is_largest_that_reaches_target(target, model):
    policy = vbmf_policy(model, target, net=NET, width=WIDTH)
    assert {c.method for c in policy.layers} <= {"tucker2", "keep"}
    bases = [tuple(b) for b in policy.meta["vbmf_ranks"]]
    assert bases == [vbmf_ranks(conv) for _, conv in conv_layers(model)]
    s = policy.meta["scale"]
    # The ranks are the EVBMF ranks times one common factor, rounded and clipped, before
    # settling raises some of them.
    convs = conv_layers(model)
    scaled = _vbmf_choices(convs, bases, s)
    for (_, conv), base, (method, rank) in zip(convs, bases, scaled):
        if method == "tucker2":
            assert rank == (
                min(conv.out_channels, max(1, math.floor(s * base[0] + 0.5))),
                min(conv.in_channels, max(1, math.floor(s * base[1] + 0.5))),
            )
    for (method, rank), choice in zip(scaled, policy.layers):
        assert choice.method == method
        assert method == "keep" or all(a >= b for a, b in zip(choice.rank, rank))
    # The largest factor that works: a slightly larger one misses the target.
    larger = Policy.from_choices(
        model, _vbmf_choices(convs, bases, s * (1 + 1e-6)), net=NET, width=WIDTH
    )
    assert _ratio(model, larger) < target <= _ratio(model, policy)
    _assert_settled(model, policy, target)


def test_vbmf_uses_the_layer_proportions():
    """Layers with different EVBMF ranks keep their proportions after scaling."""
    torch.manual_seed(0)
    model = build_vgg(NET, width=WIDTH)
    convs = conv_layers(model)
    with torch.no_grad():
        for k, (_, conv) in enumerate(convs[1:], start=1):
            o, i = conv.out_channels, conv.in_channels
            r = (max(1, o // 2), max(1, i // 8)) if k % 2 else (max(1, o // 8), max(1, i // 2))
            conv.weight.copy_(_low_rank_conv(o, i, r, noise=0.02, seed=k).weight)
    policy = vbmf_policy(model, 4, net=NET, width=WIDTH)
    bases = policy.meta["vbmf_ranks"]
    for k in range(2, len(convs)):
        (bo, bi), choice = bases[k], policy.layers[k]
        assert choice.method == "tucker2"
        ro, ri = choice.rank
        assert (ro > ri) == (bo > bi)  # the ratio's direction survives the scaling


# ----------------------------------------------------------------------------- sensitivity


def test_sensitivity_study_caches_its_evaluations(proxy, study):
    results = study.run()
    keys = study.keys()
    assert set(results) == {k for k, _ in keys}
    assert all(0.0 <= acc <= 1.0 for acc in results.values())
    # Every entry compresses only its layer, so levels that give the same rank share one run.
    assert 0 < study.evaluations <= len(keys)
    before, count = proxy.evaluations, study.evaluations
    assert study.run() == results
    sensitivity_policy(proxy, 4, study=study)
    sensitivity_policy(proxy, 8, study=study, levels=STUDY_LEVELS, methods=("tucker2", "cp"))
    strategy_policy("sensitivity", proxy, 6, study=study)
    assert proxy.evaluations == before
    assert study.evaluations == count


def test_sensitivity_study_rejects_another_setup(proxy, study):
    with pytest.raises(RlMtdError, match="levels"):
        sensitivity_policy(proxy, 4, study=study, levels=(2, 4))  # 2 is not in the study
    with pytest.raises(RlMtdError, match="methods"):
        sensitivity_policy(proxy, 4, study=study, methods=("cp", "svd"))
    with pytest.raises(RlMtdError, match="unknown method"):
        SensitivityStudy(proxy, methods=("keep",))


def test_the_heuristic_keeps_to_the_methods_and_levels_it_is_given(proxy, study):
    """A study over more than the search may use serves it (the warm start of a run with
    --methods keep,tucker2 returned CP layers, and with --levels 2,4,8 layers at 68.8x)."""
    everything = sensitivity_policy(proxy, 6, study=study)
    assert "cp" in everything.methods(), "else the test shows nothing"
    tucker = sensitivity_policy(proxy, 6, study=study, methods=("tucker2",))
    assert set(tucker.methods()) <= {"keep", "tucker2"} and tucker.meta["methods"] == ["tucker2"]
    mild = sensitivity_policy(proxy, 3, study=study, levels=(4,))
    assert max(c.ratio for c in mild.layers) <= 4 * 1.1  # the rank nearest 4x, or settled up
    assert mild.meta["levels"] == [4.0]
    with pytest.raises(RlMtdError, match="levels 4"):
        sensitivity_policy(proxy, 40, study=study, levels=(4,))  # 4x a layer cannot give 40x


@pytest.mark.slow
def test_the_warm_start_s_first_best_is_a_policy_the_search_could_choose(proxy, study, monkeypatch):
    """Without keep among --methods no layer stays whole; and where the study's share of
    --levels cannot meet the budget (only 4x of levels 4 and 128, for 8x) a study of the
    search's own grid is measured instead of the run failing."""
    import agents.warmstart as warmstart
    from envs import EnvConfig

    monkeypatch.setattr(warmstart, "behaviour_clone", lambda *a, **k: 0.85)  # no agent here
    first = warmstart.warm_start(
        proxy, EnvConfig(methods=("tucker2", "cp"), target_ratio=8.0), None, study=study
    )
    chosen = Policy.from_dict(first["policy"])
    assert "keep" not in chosen.methods() and _ratio(proxy.model, chosen) >= 8 * (1 - 1e-9)
    first = warmstart.warm_start(
        proxy, EnvConfig(levels=(4.0, 128.0), target_ratio=8.0), None, study=study
    )
    chosen = Policy.from_dict(first["policy"])
    assert chosen.meta["levels"] == [4.0, 128.0] and _ratio(proxy.model, chosen) >= 8 * (1 - 1e-9)


def test_a_study_with_other_repair_steps_serves_the_heuristic(model, proxy):
    """--study-repair-steps: the study scores with a sibling proxy (other repair steps, same
    baseline, data, factor cache and baseline accuracy, its own count of evaluations); the
    heuristic of the search's proxy uses its results without a single evaluation of its own,
    and a study of another baseline or other proxy settings is refused."""
    from dataclasses import replace

    from agents.studies import study_proxy

    same = study_proxy(proxy)
    assert same is not proxy and same.config == proxy.config
    other_steps = proxy.config.repair_steps + 1
    sibling = study_proxy(proxy, other_steps)
    assert sibling.config == replace(proxy.config, repair_steps=other_steps)
    assert (sibling.model, sibling.cache, sibling.wkeys, sibling.baseline_acc) == (
        proxy.model,
        proxy.cache,
        proxy.wkeys,
        proxy.baseline_acc,
    )
    study = SensitivityStudy(sibling, levels=(64,))
    before = proxy.evaluations
    study.run()
    policy = sensitivity_policy(proxy, 4, study=study)
    assert proxy.evaluations == before, "the study's evaluations are not the search's"
    assert sibling.evaluations == study.evaluations > 0
    assert policy.predicted_params(model) * 4 <= count_params(model)

    other_bn = study_proxy(proxy)
    other_bn.config = replace(proxy.config, bn_batches=proxy.config.bn_batches + 1)
    other = Proxy(
        build_vgg(NET, width=WIDTH),  # untrained: another baseline
        train_split=proxy.train_split,
        proxy_split=proxy.proxy_split,
        device="cpu",
        cache=FactorCache(),
    )
    for scorer in (other, other_bn):
        with pytest.raises(RlMtdError, match="another baseline or with other proxy settings"):
            sensitivity_policy(scorer, 4, study=study)


def test_a_replay_warns_when_its_study_is_not_the_agent_s(proxy, monkeypatch, caplog):
    import agents.studies as studies
    from agents.studies import layer_scores

    class Measured:
        def scores(self, baseline_acc):
            return np.zeros((8, 12), np.float32)

    monkeypatch.setattr(studies, "cached_study", lambda p, *a, **k: Measured())
    same = studies.study_settings(studies.study_proxy(proxy, 0))
    with caplog.at_level("WARNING", logger="rl_mtd"):
        assert layer_scores("study", proxy, 0, trained_on=same).shape == (8, 12)
        assert "other observations" not in caplog.text
        layer_scores("study", proxy, 0, trained_on=same.replace("train", "training"))
    assert "other observations than it learned from" in caplog.text
    assert layer_scores("layer", proxy, 0, trained_on="anything") is None


def _fabricated_study(proxy: Proxy, sensitive: int) -> SensitivityStudy:
    """A study whose results are set by hand: only layer ``sensitive`` loses accuracy."""
    fake = SensitivityStudy(proxy, levels=STUDY_LEVELS)
    for (i, method, level), _ in fake.keys():
        fake.results[(i, method, level)] = 0.0 if i == sensitive else proxy.baseline_acc
    return fake


def test_sensitivity_greedy_spares_the_sensitive_layer(model, proxy):
    last = len(conv_layers(model)) - 1
    fake = _fabricated_study(proxy, sensitive=last)
    before = proxy.evaluations
    policy = sensitivity_policy(proxy, 3, study=fake)
    assert proxy.evaluations == before and fake.evaluations == 0
    assert policy.layers[last].method == "keep"
    assert _ratio(model, policy) >= 3
    # With no accuracy to lose, the biggest cuts come first: the layer's strongest options.
    assert policy.layers[last - 1].method != "keep"


def test_sensitivity_greedy_prefers_less_loss_per_parameter(model, proxy):
    fake = SensitivityStudy(proxy, levels=STUDY_LEVELS)
    base = proxy.baseline_acc
    for (i, method, level), _ in fake.keys():
        # CP always costs a little, Tucker-2 nothing: every move should be Tucker-2.
        fake.results[(i, method, level)] = base - (0.01 if method == "cp" else 0.0)
    policy = sensitivity_policy(proxy, 4, study=fake)
    assert {c.method for c in policy.layers} <= {"tucker2", "keep"}
    assert _ratio(model, policy) >= 4


# ----------------------------------------------------------------------------- random


def test_random_policies_are_seeded_and_reach_target(model):
    a = random_policies(model, 8, 5, seed=0)
    b = random_policies(model, 8, 5, seed=0)
    c = random_policies(model, 8, 5, seed=1)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in b]
    assert [p.to_dict() for p in a] != [p.to_dict() for p in c]
    assert len({json.dumps([x.to_dict() for x in p.layers]) for p in a}) > 1  # not all alike
    for p in a + c:
        assert len(p.layers) == len(conv_layers(model))
        assert _ratio(model, p) >= 8
        _assert_settled(model, p, 8)  # at the target like every strategy, not past it
        assert p.meta["strategy"] == "random" and p.meta["target_ratio"] == 8
    assert all((p.net, p.width, p.num_classes) == (NET, WIDTH, 10) for p in a)
    # net and width come from the model's spec or the keywords.
    d = random_policies(model, 8, 5, seed=0, net=NET, width=WIDTH, num_classes=10)
    assert [p.to_dict() for p in d] == [p.to_dict() for p in a]


def test_random_policies_need_net_and_width_for_a_model_without_spec(model):
    bare = nn.Sequential(*[conv for _, conv in conv_layers(model)])
    with pytest.raises(RlMtdError, match="pass net=... and width=..."):
        random_policies(bare, 4, 1)
    (policy,) = random_policies(bare, 4, 1, net=NET, width=WIDTH)
    assert (policy.net, policy.width, policy.num_classes) == (NET, WIDTH, 10)


def test_random_policies_respect_methods_and_levels(model):
    """Draws come from the methods and levels given; settling then only raises ranks (it does
    not change a method), so no rank is below its layer's smallest level."""
    policies = random_policies(model, 4, 6, methods=("keep", "cp"), levels=(8, 32), seed=3)
    convs = conv_layers(model)
    for p in policies:
        assert {c.method for c in p.layers} <= {"keep", "cp"}
        for (_, conv), c in zip(convs, p.layers, strict=True):
            assert c.method == "keep" or c.rank >= rank_for_ratio(conv, "cp", 32)
        _assert_settled(model, p, 4)
    # Unsettled (for benchmarks that time or prefill grid options): every rank on the grid.
    allowed = {None} | {rank_for_ratio(conv, "cp", lv) for _, conv in convs for lv in (8, 32)}
    for p in random_policies(
        model, 4, 6, methods=("keep", "cp"), levels=(8, 32), seed=3, settled=False
    ):
        assert {c.rank for c in p.layers} <= allowed and _ratio(model, p) >= 4
    with pytest.raises(RlMtdError, match="'keep' alone"):
        random_policies(model, 4, 2, methods=("keep",))
    assert DEFAULT_LEVELS is BUDGET_LEVELS  # one definition, re-exported


def test_random_search_returns_the_best_by_accuracy(model, proxy):
    seen = []
    best, results = random_search(
        proxy, 4, N_RANDOM, seed=5, on_evaluation=lambda p, r: seen.append((p, r))
    )
    policies = random_policies(proxy.model, 4, N_RANDOM, seed=5, net=proxy.net, width=proxy.width)
    assert seen == list(zip(policies, results, strict=True)), "each evaluation, in order"
    assert len(results) == N_RANDOM
    top = max(r.accuracy for r in results)
    winners = [(r.compression_ratio, p) for r, p in zip(results, policies) if r.accuracy == top]
    assert best == max(winners, key=lambda w: w[0])[1]
    k = policies.index(best)
    assert math.isclose(results[k].compression_ratio, _ratio(model, best))


# ----------------------------------------------------------------------------- layering


def test_baselines_import_neither_gymnasium_nor_sb3():
    code = (
        "import sys, rl_mtd.baselines; "
        "bad = [m for m in ('gymnasium', 'stable_baselines3') if m in sys.modules]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)


def test_local_search_climbs_from_the_sensitivity_policy(proxy, study):
    from rl_mtd.baselines import local_search

    seen = []
    best, results = local_search(
        proxy, 4, 6, seed=1, study=study, on_evaluation=lambda p, r: seen.append((p, r))
    )
    assert [r for _, r in seen] == results, "every evaluation is reported, in order"
    assert any(p == best for p, _ in seen)
    start = sensitivity_policy(proxy, 4, study=study)
    assert len(results) >= 6  # 6 new evaluations; memoised repeats are extra
    assert results[0].accuracy == proxy.evaluate(start).accuracy, "first: the heuristic itself"
    assert proxy.evaluate(best).accuracy == max(r.accuracy for r in results)
    assert all(r.compression_ratio >= 4 for r in results), "every candidate meets the budget"
    assert best.meta["strategy"] == "local"


def test_local_search_makes_n_new_evaluations_and_is_seeded(proxy, study):
    """Memoised candidates are free and were counted in n: with the heuristic's policy already
    scored (compare.py's sensitivity row, on a shared proxy) local search made fewer new
    evaluations than PPO, 13-22% fewer in a review's count."""
    from rl_mtd.baselines import local_search

    def fresh() -> Proxy:
        return Proxy(
            proxy.model,
            train_split=proxy.train_split,
            proxy_split=proxy.proxy_split,
            device="cpu",
            cache=proxy.cache,
        )

    warm = fresh()
    warm.evaluate(sensitivity_policy(warm, 4, study=study))
    before = warm.evaluations
    best, results = local_search(warm, 4, 6, seed=1, study=study)
    assert warm.evaluations - before == 6
    assert results[0].cached and len(results) >= 7
    first, _ = local_search(fresh(), 4, 6, seed=1, study=study)
    again, _ = local_search(fresh(), 4, 6, seed=1, study=study)
    assert again == first, "seeded"


def test_study_scores_are_the_accuracy_lost_per_option(proxy, study):
    """SensitivityStudy.scores: one row per layer, one column per method x level, the measured
    accuracy lost as a share of the baseline's, 1 where the study measures nothing."""
    a0, n_levels = proxy.baseline_acc, len(study.levels)
    scores = study.scores(a0)
    assert scores.shape == (len(proxy.convs), 2 * n_levels) and scores.dtype == np.float32
    assert np.all((scores >= 0) & (scores <= 1))
    measured = set()
    for (i, method, level), acc in study.results.items():
        col = study.methods.index(method) * n_levels + study.levels.index(level)
        measured.add((i, col))
        assert scores[i, col] == pytest.approx(min(1.0, max(0.0, (a0 - acc) / a0)), abs=1e-6)
    assert len(set(np.unique(scores[[i for i, _ in measured], [c for _, c in measured]]))) > 1
    rest = [(i, c) for i in range(scores.shape[0]) for c in range(scores.shape[1])]
    assert all(scores[i, c] == 1.0 for i, c in rest if (i, c) not in measured)


@pytest.mark.parametrize("params, macs", [(6.0, None), (None, 3.0), (6.0, 3.0)])
def test_sensitivity_lands_at_the_target(params, macs, model, proxy, study):
    """The greedy over coarse levels overshoots; settling raises ranks until no single layer can
    grow one more step within the budget, so the policy sits at the target."""
    from rl_mtd.budget import BudgetMeter
    from rl_mtd.decompose import next_rank

    budget = Budget(params, macs)
    policy = sensitivity_policy(proxy, budget, study=study)
    meter = BudgetMeter(model, budget)
    choices = [(c.method, c.rank) for c in policy.layers]
    assert meter.meets(choices)
    for i, (method, rank) in enumerate(choices):
        if method == "keep":
            continue
        bigger = next_rank(meter.convs[i][1], method, rank)
        if bigger is not None:
            assert not meter.meets([*choices[:i], (method, bigger), *choices[i + 1 :]]), i


def test_settle_gives_the_slack_to_the_layers_named_first(model):
    """The greedy's slack goes to the layers in ``first`` (the heuristic's latest moves), then
    to the others last layer first; another order lands the slack elsewhere, and an order
    naming a layer the model lacks is refused."""
    from rl_mtd.budget import BudgetMeter, settle

    meter = BudgetMeter(model, Budget(4.0))
    n = len(meter.convs)
    start = [("keep", None), *[("tucker2", (2, 2))] * (n - 1)]  # far beyond 4x
    assert meter.meets(start)
    plain = settle(meter, start)
    assert plain == settle(meter, start, [n - 1]), "the default: last layer first"
    assert plain[-1] != start[-1], "the last layer got the slack"
    early = settle(meter, start, [1])
    assert early[1] != start[1] and early != plain, "layer 1 got it first"
    assert meter.meets(early) and meter.meets(plain)
    for bad in ([n], [-1]):
        with pytest.raises(RlMtdError, match="settle order"):
            settle(meter, start, bad)
