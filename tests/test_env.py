"""Tests for the Gymnasium environment: API checks, determinism, the budget wall, rewards."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs
from envs import DEFAULT_LEVELS, ENV_ID, EnvConfig, MixedDecompositionEnv
from rl_mtd.decompose import METHODS, FactorCache
from rl_mtd.errors import RlMtdError
from rl_mtd.metrics import count_params
from rl_mtd.models import build_vgg
from rl_mtd.policy import Policy, apply_policy
from rl_mtd.proxy import Proxy, ProxyConfig, default_repair

NET, WIDTH = "vgg11", 0.125
N_LAYERS = 8  # conv layers of VGG11
# Strong levels only: CP-ALS at high ranks takes seconds per layer on a CPU, and these tests
# need the real factorisation only where accuracy matters.
FAST_LEVELS = (16.0, 32.0, 64.0, 128.0)


@pytest.fixture(scope="module")
def splits(tiny_splits):
    return tiny_splits


@pytest.fixture(scope="module")
def baseline(tiny_baseline):
    return tiny_baseline


def make_proxy(model, splits, cache=None) -> Proxy:
    """A CPU proxy with an in-memory factor cache (never the disk cache)."""
    return Proxy(
        model,
        train_split=splits.train,
        proxy_split=splits.proxy,
        device="cpu",
        config=ProxyConfig(bn_batches=2, bn_batch_size=64, seed=0),
        cache=cache if cache is not None else FactorCache(),
        net=NET,
        width=WIDTH,
    )


@pytest.fixture(scope="module")
def proxy(baseline, splits):
    return make_proxy(baseline, splits)


class StructuralProxy(Proxy):
    """A proxy that builds the compressed structure without factorising (untrained factors).

    The compression ratio depends only on the structure, so the budget-wall tests can run many
    episodes at the weakest levels (whose CP-ALS would take seconds per layer).
    """

    def compress(self, policy):
        return apply_policy(self.model, policy, factorize=False).eval()


@pytest.fixture(scope="module")
def structural_proxy(splits):
    torch.manual_seed(0)
    model = build_vgg(NET, width=WIDTH)
    return StructuralProxy(
        model,
        train_split=splits.train,
        proxy_split=splits.proxy,
        device="cpu",
        config=ProxyConfig(bn_batches=0),
        cache=FactorCache(),
        net=NET,
        width=WIDTH,
    )


def run_episode(env, actions):
    """Step through one episode; returns (observations, rewards, infos)."""
    obs, _ = env.reset(seed=0)
    observations, rewards, infos = [obs], [], []
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(a)
        observations.append(obs)
        rewards.append(reward)
        infos.append(info)
        assert not truncated
        if terminated:
            break
    assert terminated, "the episode did not end after the last conv layer"
    return observations, rewards, infos


# ------------------------------------------------------------------------------- API checks


def test_sb3_env_checker_passes(proxy):
    from stable_baselines3.common.env_checker import check_env

    env = MixedDecompositionEnv(proxy, EnvConfig(levels=FAST_LEVELS, target_ratio=8.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, warn=True)
    sb3 = [w for w in caught if "stable_baselines3" in (w.filename or "")]
    assert not sb3, [str(w.message) for w in sb3]


def test_gymnasium_env_checker_passes(proxy):
    from gymnasium.utils.env_checker import check_env

    env = MixedDecompositionEnv(proxy, EnvConfig(levels=FAST_LEVELS, target_ratio=8.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, skip_render_check=True)
    gym_warnings = [
        w for w in caught if "gymnasium" in (w.filename or "") or "WARN:" in str(w.message)
    ]
    assert not gym_warnings, [str(w.message) for w in gym_warnings]


def test_registered_and_gym_make_works(proxy):
    assert envs.ENV_ID == ENV_ID == "rl_mtd/MixedDecomposition-v0"
    assert ENV_ID in gym.registry
    config = EnvConfig(levels=FAST_LEVELS, target_ratio=8.0)
    env = gym.make(ENV_ID, scorer=proxy, config=config)
    try:
        assert isinstance(env.unwrapped, MixedDecompositionEnv)
        assert env.unwrapped.config is config
        assert env.action_space == gym.spaces.Discrete(len(METHODS) * len(FAST_LEVELS))
        obs, info = env.reset(seed=0)
        assert env.observation_space.contains(obs)
        assert info == {}
        obs, reward, terminated, truncated, info = env.step(0)
        assert env.observation_space.contains(obs)
        assert reward == 0.0 and not terminated and not truncated
        assert info["layer"] == "features.0"
    finally:
        env.close()


# ------------------------------------------------------------------------------- determinism


def test_same_seed_same_episode(baseline, splits):
    """Two envs on two fresh proxies, actions from equally seeded action spaces: same episode."""
    config = EnvConfig(levels=FAST_LEVELS, target_ratio=8.0)
    runs = []
    for _ in range(2):
        env = MixedDecompositionEnv(make_proxy(baseline, splits), config)
        env.action_space.seed(1234)
        actions = [int(env.action_space.sample()) for _ in range(env.num_layers)]
        runs.append((actions, *run_episode(env, actions)))
    (a1, obs1, rew1, inf1), (a2, obs2, rew2, inf2) = runs
    assert a1 == a2
    assert len(obs1) == len(obs2) == N_LAYERS + 1
    for o1, o2 in zip(obs1, obs2):
        np.testing.assert_array_equal(o1, o2)
    assert rew1 == rew2
    assert [i["action"] for i in inf1] == [i["action"] for i in inf2]
    assert inf1[-1]["policy"]["layers"] == inf2[-1]["policy"]["layers"]
    p1, p2 = inf1[-1]["proxy"], inf2[-1]["proxy"]
    assert p1["accuracy"] == p2["accuracy"]
    assert p1["compression_ratio"] == p2["compression_ratio"]
    assert not p1["cached"] and not p2["cached"]
    assert p1["compression_ratio"] >= 8.0


def test_fresh_proxies_agree_on_a_policy(baseline, splits):
    """Factorisation and the BN re-estimate are seeded: identical compressed models."""
    policy = Policy.from_choices(
        baseline,
        [
            ("keep", None),
            ("tucker2", 2),
            ("cp", 4),
            ("tucker2", 4),
            ("cp", 8),
            ("tucker2", 8),
            ("cp", 8),
            ("tucker2", 6),
        ],
        net=NET,
        width=WIDTH,
    )
    p1, p2 = make_proxy(baseline, splits), make_proxy(baseline, splits)
    r1, r2 = p1.evaluate(policy), p2.evaluate(policy)
    assert r1.accuracy == r2.accuracy
    assert r1.params == r2.params and r1.compression_ratio == r2.compression_ratio
    x = splits.proxy.x[:32]
    from rl_mtd.data import normalize

    with torch.no_grad():
        out1 = p1.compress(policy)(normalize(x))
        out2 = p2.compress(policy)(normalize(x))
    assert torch.equal(out1, out2)


# ------------------------------------------------------------------------------- budget wall


def _assert_settled(env, policy_dict) -> None:
    """The finished policy meets the budget and no decomposed layer of it could take one more
    rank step within it (rl_mtd.budget.settle)."""
    from rl_mtd.budget import BudgetMeter
    from rl_mtd.decompose import next_rank

    meter = BudgetMeter(env.scorer.model, env.budget)
    policy = Policy.from_dict(policy_dict)
    choices = [(c.method, c.rank) for c in policy.layers]
    assert meter.meets(choices), (meter.excess(choices), meter.describe(choices))
    for i, (method, rank) in enumerate(choices):
        bigger = None if method == "keep" else next_rank(meter.convs[i][1], method, rank)
        if bigger is not None:
            assert not meter.meets([*choices[:i], (method, bigger), *choices[i + 1 :]]), i


@pytest.mark.parametrize("target", [4.0, 8.0, 16.0])
def test_budget_wall_reaches_target(structural_proxy, target):
    env = MixedDecompositionEnv(structural_proxy, EnvConfig(target_ratio=target))
    assert env.config.levels == DEFAULT_LEVELS
    rng = np.random.default_rng(int(target))
    n = env.action_space.n
    keep = env.encode(METHODS.index("keep"), 0)
    weakest_tucker = env.encode(METHODS.index("tucker2"), 0)
    sequences = [[keep] * N_LAYERS, [weakest_tucker] * N_LAYERS]
    sequences += [list(rng.integers(0, n, N_LAYERS)) for _ in range(30)]
    walls_hit = []
    for actions in sequences:
        _, rewards, infos = run_episode(env, actions)
        ratio = infos[-1]["proxy"]["compression_ratio"]
        assert ratio >= target, (actions, ratio)
        # The proxy measured the settled policy: at most the table's ratio for the actions
        # taken, and no layer can grow one rank step more within the budget.
        taken = [env.decode(i["action"]) for i in infos]
        assert ratio <= env.params_original / env.table.total(taken) * (1 + 1e-12)
        _assert_settled(env, infos[-1]["policy"])
        for a, info in zip(actions, infos):
            assert info["requested_action"] == int(a)
            assert info["wall"] == (info["action"] != info["requested_action"])
        assert all(r == 0.0 for r in rewards[:-1])
        walls_hit.append(any(i["wall"] for i in infos))
    assert walls_hit[0], "all-keep actions must hit the wall"
    assert walls_hit[1], "the weakest Tucker-2 level everywhere must hit the wall"


def _all_keep_then_random(env, *, seed: int, n: int) -> list[list[int]]:
    """Action sequences for the wall tests: all layers kept, then ``n`` random episodes."""
    rng = np.random.default_rng(seed)
    keep = env.encode(METHODS.index("keep"), 0)
    return [[keep] * N_LAYERS] + [
        list(rng.integers(0, env.action_space.n, N_LAYERS)) for _ in range(n)
    ]


@pytest.mark.parametrize("target, target_macs", [(8.0, 4.0), (None, 6.0), (4.0, 10.0)])
def test_budget_wall_holds_parameters_and_macs(structural_proxy, target, target_macs):
    env = MixedDecompositionEnv(
        structural_proxy, EnvConfig(target_ratio=target, target_macs=target_macs)
    )
    for actions in _all_keep_then_random(env, seed=7, n=30):
        _, _, infos = run_episode(env, actions)
        proxy = infos[-1]["proxy"]
        assert proxy["macs_ratio"] >= target_macs * (1 - 1e-12), (actions, proxy)
        if target is not None:
            assert proxy["compression_ratio"] >= target * (1 - 1e-12), (actions, proxy)
        taken = [env.decode(i["action"]) for i in infos]  # settling only adds MACs back
        assert proxy["macs"] >= env.table.total_macs(taken)
        _assert_settled(env, infos[-1]["policy"])


def _strided_net() -> torch.nn.Module:
    """A net whose last conv has stride 2: there CP is its smallest option and Tucker-2 its
    cheapest in MACs, so no one option is both (in VGG, stride 1 throughout, one always is)."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 64, 3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def test_the_wall_holds_parameters_and_macs_where_the_smallest_option_is_not_the_cheapest():
    """Both maxima were accepted together though no policy reaches both, and the wall then
    fell short of the parameter target (5.5x for 5.9x) without a word."""
    from rl_mtd.budget import Budget
    from rl_mtd.budget_table import BudgetTable

    table = BudgetTable(_strided_net(), METHODS, (4.0, 16.0))
    assert not table.minima_coincide
    both = Budget(params=table.max_ratio * 0.999, macs=table.max_macs_ratio * 0.999)
    with pytest.raises(RlMtdError, match="together with MACs reduction"):
        table.check_target(both)
    rng = np.random.default_rng(0)
    for target in (
        Budget(params=table.max_ratio * 0.9, macs=table.max_macs_ratio * 0.6),
        Budget(params=table.max_ratio * 0.6, macs=table.max_macs_ratio * 0.9),
    ):
        table.check_target(target)
        for _ in range(50):
            choices: list[tuple[int, int]] = []
            for _layer in table.layers:
                draw = (int(rng.integers(len(METHODS))), int(rng.integers(2)))
                choices.append(table.wall(choices, draw, target))
            ratio = table.params_original / table.total(choices)
            macs = table.macs_original / table.total_macs(choices)
            assert ratio >= target.params and macs >= target.macs, (choices, ratio, macs)


@pytest.mark.parametrize("target, speedup", [(None, 2.0), (4.0, 2.5)])
def test_budget_wall_holds_a_predicted_latency(structural_proxy, target, speedup):
    from conftest import FakeTimer

    from rl_mtd.latency import LatencyModel

    latency = LatencyModel(structural_proxy.model, batch_size=4, timer=FakeTimer())
    config = EnvConfig(target_ratio=target, target_latency=speedup)
    with pytest.raises(RlMtdError, match="latency model"):
        MixedDecompositionEnv(structural_proxy, config)
    env = MixedDecompositionEnv(structural_proxy, config, latency_model=latency)
    for actions in _all_keep_then_random(env, seed=11, n=20):
        obs, _, infos = run_episode(env, actions)
        policy = Policy.from_dict(infos[-1]["policy"])
        choices = policy.choices()
        assert latency.speedup(choices) >= speedup * (1 - 1e-9), actions
        if target is not None:
            assert infos[-1]["proxy"]["compression_ratio"] >= target * (1 - 1e-12)
        assert policy.meta["target_latency"] == speedup
        _assert_settled(env, infos[-1]["policy"])


def test_option_macs_match_the_built_blocks(structural_proxy):
    """The budget table's MACs of every option are what count_macs measures on the block."""
    from rl_mtd.budget_table import BudgetTable
    from rl_mtd.decompose import conv_layers
    from rl_mtd.metrics import count_macs

    model = structural_proxy.model
    table = BudgetTable(model, METHODS, (2.0, 16.0))
    for (name, _conv), layer in zip(conv_layers(model), table.layers):
        for option, (rank, _, macs) in layer.options.items():
            method = METHODS[option[0]]
            probe = Policy.from_choices(
                model,
                [(method, rank) if n == name else ("keep", None) for n, _ in conv_layers(model)],
                net=NET,
                width=WIDTH,
            )
            built = apply_policy(model, probe, factorize=False)
            expected = count_macs(built) - (table.macs_original - layer.original_macs)
            assert macs == expected, (name, method, rank)


def test_macs_target_beyond_reach_is_refused(structural_proxy):
    env = MixedDecompositionEnv(structural_proxy, EnvConfig(target_ratio=None))
    with pytest.raises(RlMtdError, match="--target-macs"):
        MixedDecompositionEnv(
            structural_proxy, EnvConfig(target_ratio=None, target_macs=env.table.max_macs_ratio * 2)
        )


def test_target_at_max_ratio_is_reachable(structural_proxy):
    probe = MixedDecompositionEnv(structural_proxy, EnvConfig(target_ratio=None))
    target = probe.max_ratio
    env = MixedDecompositionEnv(structural_proxy, EnvConfig(target_ratio=target))
    _, _, infos = run_episode(env, [0] * N_LAYERS)  # keep everywhere
    assert infos[-1]["proxy"]["compression_ratio"] >= target * (1 - 1e-12)


def test_target_beyond_reach_names_the_max(structural_proxy):
    max_ratio = MixedDecompositionEnv(structural_proxy, EnvConfig(target_ratio=None)).max_ratio
    assert 1 < max_ratio < 1000
    with pytest.raises(RlMtdError, match="at most") as excinfo:
        MixedDecompositionEnv(structural_proxy, EnvConfig(target_ratio=1000.0))
    assert f"{max_ratio:.1f}" in str(excinfo.value)
    assert "1000" in str(excinfo.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_ratio=0.5),
        dict(methods=("keep",)),
        dict(levels=(4.0, 2.0)),
        dict(levels=(1.0,)),
        dict(methods=("svd",)),
    ],
)
def test_bad_env_config_is_refused(kwargs):
    with pytest.raises(RlMtdError):
        EnvConfig(**kwargs)


# ------------------------------------------------------------------------------- rewards


def test_tradeoff_reward(proxy):
    weight = 0.1
    env = MixedDecompositionEnv(
        proxy, EnvConfig(levels=FAST_LEVELS, target_ratio=None, tradeoff_weight=weight)
    )
    # No wall in trade-off mode: all-keep stays all-keep, ratio 1, accuracy the baseline's.
    _, rewards, infos = run_episode(env, [0] * N_LAYERS)
    assert not any(i["wall"] for i in infos)
    assert [layer["method"] for layer in infos[-1]["policy"]["layers"]] == ["keep"] * N_LAYERS
    res = infos[-1]["proxy"]
    assert res["compression_ratio"] == pytest.approx(1.0)
    assert rewards[-1] == pytest.approx(res["accuracy"] - proxy.baseline_acc, abs=1e-12)
    # A compressing episode: reward = (acc - baseline) + weight * log2(ratio).
    tucker = METHODS.index("tucker2")
    actions = [env.encode(tucker, k % len(FAST_LEVELS)) for k in range(N_LAYERS)]
    _, rewards, infos = run_episode(env, actions)
    res = infos[-1]["proxy"]
    assert res["compression_ratio"] > 4
    expected = (res["accuracy"] - proxy.baseline_acc) + weight * math.log2(res["compression_ratio"])
    assert rewards[-1] == pytest.approx(expected, abs=1e-12)
    assert infos[-1]["reward"] == rewards[-1]
    assert infos[-1]["baseline_acc"] == proxy.baseline_acc


def test_budget_reward_bonus_beyond_target(structural_proxy):
    target, weight = 4.0, 0.05
    env = MixedDecompositionEnv(
        structural_proxy, EnvConfig(target_ratio=target, beyond_target_weight=weight)
    )
    strongest = [env.encode(METHODS.index("cp"), len(DEFAULT_LEVELS) - 1)] * N_LAYERS
    _, rewards, infos = run_episode(env, strongest)
    res = infos[-1]["proxy"]
    gain = res["accuracy"] - structural_proxy.baseline_acc
    assert res["compression_ratio"] > target
    expected = gain + weight * math.log2(res["compression_ratio"] / target)
    assert rewards[-1] == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------------- spaces


def test_observations_float32_in_unit_box(structural_proxy):
    env = MixedDecompositionEnv(structural_proxy, EnvConfig(target_ratio=8.0, target_macs=2.0))
    assert env.observation_space.shape == (14,)
    assert env.observation_space.dtype == np.float32
    rng = np.random.default_rng(0)
    for _ in range(5):
        actions = list(rng.integers(0, env.action_space.n, N_LAYERS))
        observations, _, _ = run_episode(env, actions)
        for obs in observations:
            assert obs.dtype == np.float32
            assert obs.shape == (14,)
            assert np.all(obs >= 0) and np.all(obs <= 1)
            assert env.observation_space.contains(obs)
        stacked = np.stack(observations[:-1])
        # Feature 0 is the layer index, min-max normalised over the layers.
        np.testing.assert_allclose(stacked[:, 0], np.linspace(0, 1, N_LAYERS), atol=1e-6)
        # Budget used only grows; budgets left and remaining original share only shrink.
        assert np.all(np.diff(stacked[:, 8]) >= 0)
        assert np.all(np.diff(stacked[:, 9]) <= 0)
        assert np.all(np.diff(stacked[:, 10]) <= 0) and stacked[0, 10] > 0
        assert np.all(np.diff(stacked[:, 11]) < 0)
        assert stacked[0, 11] == pytest.approx(1.0)
        assert stacked[0, 12] == 0 and stacked[0, 13] == 0  # no previous action yet


def test_layer_scores_show_with_their_layer(structural_proxy):
    """Per-layer scores (the study's, in a search with --observe study) sit between the static
    features and the episode state, the current layer's row at each step."""
    scores = np.linspace(0, 1, N_LAYERS * 3, dtype=np.float32).reshape(N_LAYERS, 3)
    plain = MixedDecompositionEnv(structural_proxy, EnvConfig(target_ratio=8.0))
    env = MixedDecompositionEnv(structural_proxy, EnvConfig(target_ratio=8.0), layer_scores=scores)
    assert env.observation_space.shape == (17,)
    observations, _, _ = run_episode(env, [0] * N_LAYERS)
    reference, _, _ = run_episode(plain, [0] * N_LAYERS)
    for i, (obs, ref) in enumerate(zip(observations[:-1], reference[:-1])):
        np.testing.assert_array_equal(obs[8:11], scores[i])
        np.testing.assert_array_equal(np.delete(obs, [8, 9, 10]), ref)
    for bad, match in (
        (np.zeros((N_LAYERS - 1, 3)), "one row per conv layer"),
        (np.zeros(N_LAYERS), "one row per conv layer"),
        (np.full((N_LAYERS, 2), np.nan), "finite"),
    ):
        with pytest.raises(RlMtdError, match=match):
            MixedDecompositionEnv(structural_proxy, EnvConfig(target_ratio=8.0), layer_scores=bad)


def test_tradeoff_mode_has_no_budget_left(structural_proxy):
    env = MixedDecompositionEnv(structural_proxy, EnvConfig(target_ratio=None))
    obs, _ = env.reset(seed=0)
    assert obs[9] == 0.0 and obs[10] == 0.0


def test_action_decode_encode_round_trip(structural_proxy):
    config = EnvConfig(levels=(2.0, 8.0, 32.0), methods=("tucker2", "keep", "cp"), target_ratio=4)
    env = MixedDecompositionEnv(structural_proxy, config)
    assert env.action_space.n == 9
    seen = set()
    for a in range(env.action_space.n):
        mi, li = env.decode(a)
        assert 0 <= mi < 3 and 0 <= li < 3
        assert env.encode(mi, li) == a
        seen.add((mi, li))
    assert len(seen) == 9
    assert env.decode(np.int64(4)) == (1, 1)
    for bad in (-1, env.action_space.n):
        with pytest.raises(ValueError):
            env.decode(bad)
    # The decoded method is the one the step reports (no wall in trade-off mode).
    env = MixedDecompositionEnv(structural_proxy, EnvConfig(target_ratio=None))
    env.reset(seed=0)
    a = env.encode(METHODS.index("cp"), 2)
    _, _, _, _, info = env.step(a)
    assert info["method"] == "cp" and info["level"] == DEFAULT_LEVELS[2]
    assert info["action"] == a


def test_step_after_episode_end_raises(structural_proxy):
    env = MixedDecompositionEnv(structural_proxy, EnvConfig(target_ratio=None))
    run_episode(env, [0] * N_LAYERS)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)


# ------------------------------------------------------------------------------- proxy


def test_proxy_memoises(baseline, splits):
    proxy = make_proxy(baseline, splits)
    choices = [("keep", None)] + [("tucker2", 4)] * (N_LAYERS - 1)
    policy = Policy.from_choices(baseline, choices, net=NET, width=WIDTH)
    first = proxy.evaluate(policy)
    assert not first.cached
    assert proxy.evaluations == 1
    again = Policy.from_choices(baseline, choices, net=NET, width=WIDTH)  # equal, not identical
    second = proxy.evaluate(again)
    assert second.cached
    assert proxy.evaluations == 1
    assert second.accuracy == first.accuracy
    assert second.compression_ratio == first.compression_ratio
    assert first.compression_ratio == pytest.approx(
        count_params(baseline) / count_params(proxy.compress(policy))
    )
    other = Policy.from_choices(baseline, [("keep", None)] * N_LAYERS, net=NET, width=WIDTH)
    third = proxy.evaluate(other)
    assert not third.cached
    assert proxy.evaluations == 2
    assert third.accuracy == proxy.baseline_acc  # keep-all: no BN re-estimate, same model


def test_proxy_repair_is_seeded_and_leaves_the_baseline_alone(baseline, splits):
    """The repair trains the compressed copy only, the same way every time, and is skipped for
    keep-all (whose score stays the baseline's)."""
    before = {k: v.clone() for k, v in baseline.state_dict().items()}
    repair = replace(default_repair(), batch_size=64)
    cfg = ProxyConfig(bn_batches=2, bn_batch_size=64, repair_steps=3, repair=repair, seed=0)

    def repaired_proxy():
        return Proxy(
            baseline,
            train_split=splits.train,
            proxy_split=splits.proxy,
            device="cpu",
            config=cfg,
            cache=FactorCache(),
            net=NET,
            width=WIDTH,
        )

    choices = [("keep", None)] + [("tucker2", 2)] * (N_LAYERS - 1)
    policy = Policy.from_choices(baseline, choices, net=NET, width=WIDTH)
    p1, p2, plain = repaired_proxy(), repaired_proxy(), make_proxy(baseline, splits)
    r1, r2 = p1.evaluate(policy), p2.evaluate(policy)
    assert r1.accuracy == r2.accuracy
    assert r1.params == plain.evaluate(policy).params  # the repair changes weights, not structure
    m1 = p1.compress(policy)
    p1.repair(m1)
    m_plain = plain.compress(policy)
    changed = [
        n
        for n, v in m1.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, m_plain.state_dict()[n])
    ]
    assert any(n.endswith("weight") for n in changed)  # SGD steps moved the factors
    for k, v in baseline.state_dict().items():  # the teacher was not trained
        assert torch.equal(v, before[k]), k
    keep_all = Policy.from_choices(baseline, [("keep", None)] * N_LAYERS, net=NET, width=WIDTH)
    assert p1.evaluate(keep_all).accuracy == p1.baseline_acc


def test_proxy_config_refuses_bad_repair_settings():
    with pytest.raises(ValueError, match="kd_alpha"):
        ProxyConfig(repair=replace(default_repair(), kd_alpha=1.5))
    with pytest.raises(RlMtdError, match="repair_steps"):
        ProxyConfig(repair_steps=-1)


def _agent_and_best(proxy):
    """A fresh PPO agent, its environment factory, a best episode, the actions that replay it
    and the agent's mean probability of them (the self-imitation tests)."""
    from stable_baselines3.common.logger import configure
    from stable_baselines3.common.vec_env import DummyVecEnv

    from agents.ppo import make_ppo
    from agents.warmstart import _follow

    cfg = EnvConfig(levels=FAST_LEVELS, target_ratio=8.0)

    def make_env():
        return MixedDecompositionEnv(proxy, cfg)

    agent = make_ppo(DummyVecEnv([make_env]), N_LAYERS, seed=0)
    agent.set_logger(configure(None, []))
    env = make_env()
    run_episode(env, [env.encode(1, 0), env.encode(2, 3), *[env.encode(1, 2)] * 6])
    best = {"episode": 4, "policy": env.current_policy().to_dict()}
    observations, actions = _follow(make_env(), Policy.from_dict(best["policy"]))

    def prob() -> float:
        with torch.no_grad():
            dist = agent.policy.get_distribution(torch.as_tensor(observations))
            return float(dist.log_prob(torch.as_tensor(actions)).exp().mean())

    return agent, make_env, best, observations, actions, prob


def test_imitating_the_best_centres_the_agent_on_it(structural_proxy):
    """--imitate-best: at the first rollout after a new best the agent picks that policy's
    actions with the target probability; while the best stays the same it is not cloned again."""
    from agents.warmstart import ImitateBest

    agent, make_env, best, _, _, prob = _agent_and_best(structural_proxy)
    current = None
    imitate = ImitateBest(lambda: current, make_env, target_prob=0.85)
    imitate.init_callback(agent)
    imitate.on_training_start({}, {})
    imitate.on_rollout_start()
    assert imitate.clones == 0, "no best yet: nothing to imitate"
    before = prob()
    current = best
    imitate.on_rollout_start()
    assert imitate.clones == 1 and prob() >= 0.85 - 0.02 > before, (before, prob())
    imitate.on_rollout_start()
    assert imitate.clones == 1, "the same best is not cloned twice"
    current = {**best, "episode": 9}
    imitate.on_rollout_start()
    assert imitate.clones == 2 and imitate.cloned == 9
    resumed = ImitateBest(lambda: current, make_env, target_prob=0.85, cloned=9)
    resumed.init_callback(agent)
    resumed.on_training_start({}, {})
    resumed.on_rollout_start()
    assert resumed.clones == 0, "a resumed search does not clone the saved best again"


def test_imitation_recentres_an_agent_stuck_on_scored_policies(structural_proxy):
    """--imitate-best: after a rollout that only repeated policies the proxy had scored, the
    agent - here made almost sure of the best - is cloned back to the target probability, less
    sure, so it explores again; a rollout with new policies leaves it alone."""
    from agents.warmstart import ImitateBest, behaviour_clone

    agent, make_env, best, observations, actions, prob = _agent_and_best(structural_proxy)
    fresh = 3
    imitate = ImitateBest(lambda: best, make_env, target_prob=0.85, fresh=lambda: fresh)
    imitate.init_callback(agent)
    imitate.on_training_start({}, {})
    imitate.on_rollout_start()
    assert (imitate.clones, imitate.recentres) == (1, 0)
    assert behaviour_clone(agent, observations, actions, 0.99) >= 0.99  # collapsed onto it
    fresh = 5  # the last rollout scored new policies: not stuck
    imitate.on_rollout_start()
    assert imitate.recentres == 0 and prob() >= 0.99
    imitate.on_rollout_start()  # no new policy since the last rollout started: stuck
    assert (imitate.clones, imitate.recentres) == (1, 1)
    assert 0.85 - 0.02 <= prob() <= 0.85, prob()


def test_imitation_targets_replay_the_policy_they_imitate(structural_proxy):
    """The actions cloned towards a settled policy (``_follow``) give that very policy when
    taken: settled ranks lie above a level, so each layer's action is the largest level
    within its size, which settling raises back."""
    from agents.warmstart import _follow

    cfg = EnvConfig(levels=FAST_LEVELS, target_ratio=8.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        env = MixedDecompositionEnv(structural_proxy, cfg)
        run_episode(env, rng.integers(0, env.action_space.n, N_LAYERS))
        best = env.current_policy()
        replay = MixedDecompositionEnv(structural_proxy, cfg)
        _, actions = _follow(MixedDecompositionEnv(structural_proxy, cfg), best)
        run_episode(replay, actions)
        assert replay.current_policy().to_dict()["layers"] == best.to_dict()["layers"]


@pytest.mark.parametrize("settle_by", ["study", "moves"])
@pytest.mark.parametrize("target", [4.0, 8.0, 16.0])
def test_the_heuristics_options_replayed_in_the_env_give_its_very_policy(
    structural_proxy, target, settle_by
):
    """The warm start and local search start from the heuristic's options on the env's grid;
    walled and settled by the env as the heuristic settled (by its study's points, the default,
    or in its order, the layers it moved last first: its ``meta``, ``rl_mtd.settle.settle_of``)
    they must give the heuristic's policy, not a neighbour of it. (Settled last layer first,
    2-3 layers' ranks differed at 8x-32x on VGG11 width 0.25.) Studies with random results, so
    the greedy moves the layers in many orders."""
    from agents.warmstart import _follow
    from rl_mtd.baselines import SensitivityStudy, sensitivity_policy
    from rl_mtd.baselines.local import _policy, _walled
    from rl_mtd.budget import Budget, BudgetMeter
    from rl_mtd.settle import settle_of

    rng = np.random.default_rng(int(target))
    differ = neighbours = 0
    for _ in range(4):
        fake = SensitivityStudy(structural_proxy)
        for key, _ in fake.keys():
            fake.results[key] = float(rng.uniform(0.0, 1.0))
        heuristic = sensitivity_policy(structural_proxy, target, study=fake, settle_by=settle_by)
        assert ("settle_points" in heuristic.meta) == (settle_by == "study")
        first, points = settle_of(heuristic.meta)
        cfg = EnvConfig(target_ratio=target, settle_first=first, settle_points=points)
        _, actions = _follow(MixedDecompositionEnv(structural_proxy, cfg), heuristic)
        _, _, infos = run_episode(MixedDecompositionEnv(structural_proxy, cfg), actions)
        assert not any(info["wall"] for info in infos), "the heuristic's options meet the budget"
        assert infos[-1]["policy"]["layers"] == heuristic.to_dict()["layers"]
        grid = MixedDecompositionEnv(structural_proxy, cfg).table
        differ += heuristic.choices() != grid.to_choices(grid.options_of(heuristic))
        # local search settles its candidates alike: the heuristic's options, as it perturbs
        # them, give the heuristic's policy back
        meter = BudgetMeter(structural_proxy.model, Budget(target))
        walled = _walled(grid, grid.options_of(heuristic), Budget(target))
        mine = _policy(grid, structural_proxy, walled, meter, 0, 1, (first, points))
        assert mine.choices() == heuristic.choices()
        plain = EnvConfig(target_ratio=target)  # last layer first
        _, _, infos = run_episode(MixedDecompositionEnv(structural_proxy, plain), actions)
        neighbours += infos[-1]["policy"]["layers"] != heuristic.to_dict()["layers"]
    if target >= 8.0:
        assert neighbours, "no study where the settling mattered: it is not checked"
    assert differ, "settling raised no rank above the grid: the replay checked nothing"
