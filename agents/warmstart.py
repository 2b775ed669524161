"""Start the search from the best known answer: the sensitivity heuristic's policy.

``--warm-start sensitivity`` runs MTD's per-layer sensitivity study (``agents.studies``:
cached per baseline and proxy settings, so a second search on the same baseline pays nothing),
takes the heuristic's greedy policy as the search's first best, and behaviour-clones the PPO
policy towards the heuristic's actions until it picks them with probability ``BC_TARGET_PROB``
on average: the agent then explores around the heuristic instead of from uniform, and the
search can only end at or above the heuristic by the proxy's measure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback

from agents.studies import cached_study
from envs.mixed_decomposition import EnvConfig, MixedDecompositionEnv
from rl_mtd.baselines import SensitivityStudy, sensitivity_policy
from rl_mtd.budget_table import BudgetTable
from rl_mtd.decompose import DECOMPOSED
from rl_mtd.errors import RlMtdError
from rl_mtd.policy import Policy
from rl_mtd.proxy import Proxy
from rl_mtd.settle import settle_of

log = logging.getLogger("rl_mtd")

BC_TARGET_PROB = 0.85
"""Behaviour cloning stops once the heuristic's actions have this mean probability."""
BC_MAX_STEPS = 500
BC_TOLERANCE = 0.05
"""How much surer than the target a two-sided clone leaves an agent alone."""
BC_LR = 1e-3


def heuristic_start(
    proxy: Proxy,
    env_cfg: EnvConfig,
    *,
    study: SensitivityStudy | None = None,
    latency_model: Any = None,
) -> tuple[Policy, SensitivityStudy]:
    """The sensitivity heuristic's policy a search starts from, and the study it came from.

    Its ``meta["settle_points"]`` and ``["settle_first"]`` say how the search's environments
    settle (``EnvConfig``), so that the heuristic's options give its policy back.
    ``study``: the study already at hand (default: ``cached_study(proxy)``)."""
    study = study if study is not None else cached_study(proxy)
    env = MixedDecompositionEnv(proxy, env_cfg, latency_model=latency_model)
    # The heuristic moves only to what the search may choose (--methods, --levels, keeping a
    # layer only where keep is among them). Where the study's share of those options cannot
    # meet the budget, a study of the search's own grid is measured (with the study's proxy;
    # a cached one's seconds are not charged again).
    methods = tuple(m for m in study.methods if m in env_cfg.methods)
    levels = tuple(lv for lv in study.levels if lv in env_cfg.levels)
    if not _reaches(proxy, methods, levels, env.budget):
        study = cached_study(
            study.proxy,
            methods=tuple(m for m in DECOMPOSED if m in env_cfg.methods),
            levels=env_cfg.levels,
        )
        methods, levels = study.methods, study.levels
    policy = sensitivity_policy(
        proxy,
        env.budget,
        study=study,
        methods=methods,
        levels=levels,
        keep="keep" in env_cfg.methods,
    )
    return policy, study


def warm_start(
    proxy: Proxy,
    env_cfg: EnvConfig,
    agent: Any,
    *,
    scores: np.ndarray | None = None,
    study: SensitivityStudy | None = None,
    start: tuple[Policy, SensitivityStudy] | None = None,
    target_prob: float = BC_TARGET_PROB,
    latency_model: Any = None,
) -> dict[str, Any]:
    """Study, heuristic policy and behaviour cloning; returns the search's first best entry
    (the keys ``SearchCallback`` keeps for an episode) plus what it cost. ``scores``: the
    search environments' ``layer_scores``, so the cloned observations are the agent's own;
    ``study``: the study already at hand (default: ``cached_study(proxy)``); ``start``: the
    heuristic's policy and study when already made (``heuristic_start``; the cloned episodes
    settle as it did, whatever ``env_cfg`` says); ``target_prob``:
    how sure of the heuristic's actions cloning leaves the agent (its exploration radius:
    at 0.85 an episode departs from the heuristic in about one layer in seven, at 0.5 in
    half of them; 0.85 is what the 16x comparison of BENCHMARKS.md measured);
    ``latency_model``: the search environments' (with a latency target)."""
    t0 = time.perf_counter()
    if start is None:
        start = heuristic_start(proxy, env_cfg, study=study, latency_model=latency_model)
    policy, study = start
    first, points = settle_of(policy.meta)
    env_cfg = replace(env_cfg, settle_first=first, settle_points=points)
    env = MixedDecompositionEnv(proxy, env_cfg, layer_scores=scores, latency_model=latency_model)
    observations, actions = _follow(env, policy)
    prob = behaviour_clone(agent, observations, actions, target_prob)
    # The first best is the heuristic's own policy, scored as it is (not as the agent's grid
    # actions for it replay).
    result = proxy.evaluate(policy)
    proxy_result = result.to_dict()
    reward = env.reward(result.accuracy, result.compression_ratio, result.macs_ratio)
    policy_dict = policy.to_dict()
    log.info(
        "warm start: sensitivity policy %.2fx, proxy accuracy %.2f%% (%d study evaluations); "
        "the agent now picks its actions with mean probability %.2f",
        proxy_result["compression_ratio"],
        100 * proxy_result["accuracy"],
        study.evaluations,
        prob,
    )
    return {
        "episode": 0,
        "timestep": 0,
        "reward": reward,
        "accuracy": proxy_result["accuracy"],
        "ratio": proxy_result["compression_ratio"],
        "macs_ratio": proxy_result["macs_ratio"],
        "seconds": time.perf_counter() - t0,
        "cached": proxy_result["cached"],
        "wall_fraction": 0.0,
        "methods": [layer["method"] for layer in policy_dict["layers"]],
        "policy": policy_dict,
        "proxy": proxy_result,
        "strategy": "sensitivity",
        "study_evaluations": study.evaluations,
        "study_seconds": study.seconds,
    }


def _reaches(proxy: Proxy, methods: tuple[str, ...], levels: tuple[float, ...], budget) -> bool:
    """Whether ``methods`` x ``levels`` can meet ``budget`` on ``proxy``'s model."""
    if not methods or not levels:
        return False
    try:
        BudgetTable(proxy.model, methods, levels).check_target(budget)
    except RlMtdError:
        return False
    return True


def _follow(env: MixedDecompositionEnv, policy: Policy) -> tuple[np.ndarray, np.ndarray]:
    """The observations ``env`` shows an agent taking the actions of ``policy``'s choices on its
    grid (``BudgetTable.options_of``), and those actions. Walled and settled by the env they
    give the heuristic's policy back (the env settles as the heuristic did); the heuristic's
    own policy is scored as the search's first best. The last action is not taken: the
    episode would score a policy the warm start does not use (it scores the heuristic's own)."""
    obs, _ = env.reset(seed=0)
    observations, actions = [], []
    options = env.table.options_of(policy)
    for i, option in enumerate(options):
        action = env.encode(*option)
        observations.append(obs)
        actions.append(action)
        if i < len(options) - 1:
            obs, _, _, _, _ = env.step(action)
    return np.stack(observations), np.asarray(actions)


def behaviour_clone(
    agent: Any,
    observations: np.ndarray,
    actions: np.ndarray,
    target_prob: float = BC_TARGET_PROB,
    *,
    two_sided: bool = False,
) -> float:
    """Fit the agent's policy to pick ``actions`` at ``observations`` until their mean
    probability reaches ``target_prob``; returns the final mean probability. ``two_sided``:
    an agent surer than ``target_prob`` (by more than ``BC_TOLERANCE``) is made less sure,
    down to ``target_prob``, so it explores around ``actions`` again."""
    policy = agent.policy
    obs = torch.as_tensor(observations, device=policy.device)
    act = torch.as_tensor(actions, device=policy.device)
    optimizer = torch.optim.Adam(policy.parameters(), lr=BC_LR)
    with torch.no_grad():
        prob = float(policy.get_distribution(obs).log_prob(act).exp().mean())
    sign = -1.0 if two_sided and prob > target_prob + BC_TOLERANCE else 1.0
    for _ in range(BC_MAX_STEPS):
        log_prob = policy.get_distribution(obs).log_prob(act)
        prob = float(log_prob.detach().exp().mean())
        if (prob >= target_prob) if sign > 0 else (prob <= target_prob):
            break
        optimizer.zero_grad()
        (-sign * log_prob.mean()).backward()
        optimizer.step()
    return prob


class ImitateBest(BaseCallback):
    """Self-imitation (after Oh et al., 2018): at the start of every rollout that follows a new
    best episode, clone the agent towards the best policy's actions until it picks them with
    mean probability ``target_prob``. Between clones PPO updates as usual, so the agent's
    episodes stay centred on the best policy found so far (as local search's are) while what
    it learned decides where they depart from it. Cloning at the start of a rollout keeps the
    rollout's log-probabilities those of the policy that collected it.

    ``fresh`` (the number of episodes so far that the proxy had not scored before): when a
    whole rollout only repeated policies already scored, PPO has collapsed onto them (at 8x the
    agent settled within 20-30 episodes, in one seed on a policy 2 points below its best, and
    repeated it for the rest of the search); the agent is then re-centred on the best, two-sided:
    back to ``target_prob``, less sure if it was surer, so its episodes explore again."""

    def __init__(
        self,
        best: Callable[[], dict[str, Any] | None],
        make_env: Callable[[], MixedDecompositionEnv],
        target_prob: float = BC_TARGET_PROB,
        cloned: int | None = None,
        fresh: Callable[[], int] | None = None,
    ):
        super().__init__()
        self.best = best
        self.make_env = make_env
        self.target_prob = target_prob
        self.clones = 0
        self.recentres = 0
        self.cloned = cloned
        """The episode of the best last cloned (a resumed search passes the saved one)."""
        self.fresh = fresh
        self._fresh_at_last_rollout: int | None = None

    def _on_training_start(self) -> None:
        best = self.best()  # the warm start has already cloned towards its own first best
        if self.cloned is None and best is not None and best.get("strategy") == "sensitivity":
            self.cloned = best["episode"]

    def _on_rollout_start(self) -> None:
        best = self.best()
        fresh = self.fresh() if self.fresh is not None else None
        stuck = fresh is not None and fresh == self._fresh_at_last_rollout
        self._fresh_at_last_rollout = fresh
        if best is None or (best["episode"] == self.cloned and not stuck):
            return
        observations, actions = _follow(self.make_env(), Policy.from_dict(best["policy"]))
        new_best = best["episode"] != self.cloned
        prob = behaviour_clone(
            self.model, observations, actions, self.target_prob, two_sided=not new_best
        )
        self.cloned = best["episode"]
        if new_best:
            self.clones += 1
        else:
            self.recentres += 1
        self.logger.record("search/imitation_prob", prob)
        log.debug(
            "%s the best episode %s: probability %.2f",
            "imitating" if new_best else "stuck on scored policies; re-centring on",
            best["episode"],
            prob,
        )

    def _on_step(self) -> bool:
        return True
