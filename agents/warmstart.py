"""Start the search from the best known answer: the sensitivity heuristic's policy.

``--warm-start sensitivity`` runs MTD's per-layer sensitivity study (cached per baseline and
proxy settings, so a second search on the same baseline pays nothing), takes the heuristic's
greedy policy as the search's first best, and behaviour-clones the PPO policy towards the
heuristic's actions until it picks them with probability ``BC_TARGET_PROB`` on average: the
agent then explores around the heuristic instead of from uniform, and the search can only end
at or above the heuristic by the proxy's measure.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback

from envs.mixed_decomposition import EnvConfig, MixedDecompositionEnv
from rl_mtd.baselines import SENSITIVITY_LEVELS, SensitivityStudy, sensitivity_policy
from rl_mtd.budget_table import BudgetTable
from rl_mtd.decompose import DECOMPOSED
from rl_mtd.errors import RlMtdError
from rl_mtd.io import cache_dir, write_json_atomic
from rl_mtd.policy import Policy
from rl_mtd.proxy import Proxy

log = logging.getLogger("rl_mtd")

BC_TARGET_PROB = 0.85
"""Behaviour cloning stops once the heuristic's actions have this mean probability."""
BC_MAX_STEPS = 500
BC_TOLERANCE = 0.05
"""How much surer than the target a two-sided clone leaves an agent alone."""
BC_LR = 1e-3


def warm_start(
    proxy: Proxy,
    env_cfg: EnvConfig,
    agent: Any,
    *,
    scores: np.ndarray | None = None,
    study: SensitivityStudy | None = None,
    target_prob: float = BC_TARGET_PROB,
    latency_model: Any = None,
) -> dict[str, Any]:
    """Study, heuristic policy and behaviour cloning; returns the search's first best entry
    (the keys ``SearchCallback`` keeps for an episode) plus what it cost. ``scores``: the
    search environments' ``layer_scores``, so the cloned observations are the agent's own;
    ``study``: the study already at hand (default: ``cached_study(proxy)``); ``target_prob``:
    how sure of the heuristic's actions cloning leaves the agent (its exploration radius:
    at 0.85 an episode departs from the heuristic in about one layer in seven, at 0.5 in
    half of them; 0.85 is what the 16x comparison of BENCHMARKS.md measured);
    ``latency_model``: the search environments' (with a latency target)."""
    t0 = time.perf_counter()
    study = study if study is not None else cached_study(proxy)
    env = MixedDecompositionEnv(proxy, env_cfg, layer_scores=scores, latency_model=latency_model)
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
    grid (``BudgetTable.options_of``), and those actions. Walled and settled by the env (last
    layer first) they give a neighbour of the heuristic's policy, which settles the layers it
    moved last first: the same options, ranks raised elsewhere; the heuristic's own policy is
    scored as the search's first best. The last action is not taken: the episode would score a
    policy the warm start does not use (it scores the heuristic's own)."""
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


STUDY_SAVE_EVERY_S = 30.0
"""How often a running study is written to its cache file (it takes minutes on a CPU)."""

STUDY_KEY_VERSION = 3
"""Bump when a default of ``ProxyConfig`` (or its repair) changes what a study measures: keys
list only the settings that differ from the defaults; or when ``rank_for_ratio`` changes the
rank of a (method, level) entry (3: Tucker-2 on a layer with few input channels)."""


def _settings(config: Any) -> str:
    """A dataclass's settings for a cache key: the fields that differ from their defaults
    (nested dataclasses alike), so adding a field with a default keeps existing keys."""
    default = type(config)()
    out = {}
    for f in fields(config):
        value, base = getattr(config, f.name), getattr(default, f.name)
        if is_dataclass(value):
            value = _settings(value)
            if value == _settings(base):
                continue
        elif value == base:
            continue
        out[f.name] = value
    return repr(sorted(out.items()))


def study_proxy(proxy: Proxy, steps: int | None = None) -> Proxy:
    """What the sensitivity study scores with: a sibling of ``proxy`` (the same baseline, data,
    factor cache, fitted input moments and baseline accuracy) with ``steps`` repair steps per
    entry (None: ``proxy``'s own), its memo and evaluation count its own, so the study's
    evaluations are never counted as the search's."""
    sibling = copy.copy(proxy)
    if steps is not None:
        sibling.config = replace(proxy.config, repair_steps=steps)
    sibling._memo = {}
    sibling.evaluations = 0
    return sibling


def study_settings(proxy: Proxy) -> str:
    """What, besides the baseline, decides a study's numbers: the proxy's settings that differ
    from the defaults, and its split sizes (recorded in agent.zip for replays)."""
    return (
        f"{_settings(proxy.config)}, {len(proxy.train_split)} train and "
        f"{len(proxy.proxy_split)} proxy images"
    )


def layer_scores(
    observe: str, proxy: Proxy, study_steps: int | None = None, trained_on: Any = None
) -> np.ndarray | None:
    """The per-layer features ``--observe`` adds to the observation (None for ``layer``), from
    the study with ``study_steps`` repair steps per entry (None: the proxy's own).
    ``trained_on``: the ``study_settings`` an agent was trained with (a replay warns when this
    study is measured otherwise, so its observations differ)."""
    if observe != "study":
        return None
    sibling = study_proxy(proxy, study_steps)
    if trained_on is not None and trained_on != study_settings(sibling):
        log.warning(
            "the agent was trained on a sensitivity study measured with %s; this run measures "
            "it with %s, so the agent sees other observations than it learned from (replay "
            "with the same --seed, --preset and proxy flags for the same study)",
            trained_on,
            study_settings(sibling),
        )
    return cached_study(sibling).scores(proxy.baseline_acc)


def study_path(proxy: Proxy, study: SensitivityStudy) -> Path:
    """Where ``cached_study`` keeps the study: keyed by the baseline's kernels and the rest of
    its weights (BatchNorm, head: two checkpoints alike but for those shared a study), the
    proxy's settings, the proxy split's images and labels (so one checkpoint scored on another
    dataset, or another draw of the split, gets its own study), the split sizes, and the study's
    methods and levels."""
    images = hashlib.sha256(proxy.proxy_split.x.cpu().contiguous().numpy().tobytes())
    images.update(proxy.proxy_split.y.cpu().contiguous().numpy().tobytes())
    weights = hashlib.sha256()
    for name, tensor in proxy.model.state_dict().items():
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    key = hashlib.sha256(
        json.dumps(
            [
                STUDY_KEY_VERSION,
                proxy.wkeys,
                _settings(proxy.config),
                len(proxy.train_split),
                len(proxy.proxy_split),
                images.hexdigest()[:16],
                weights.hexdigest()[:16],
                study.methods,
                study.levels,
            ]
        ).encode()
    ).hexdigest()[:16]
    return cache_dir() / "studies" / f"{key}.json"


def cached_study(
    proxy: Proxy,
    on_progress: Callable[[int, int], None] | None = None,
    *,
    methods: Sequence[str] = DECOMPOSED,
    levels: Sequence[float] = SENSITIVITY_LEVELS,
) -> SensitivityStudy:
    """A sensitivity study whose results are kept on disk per baseline, proxy settings, methods
    and levels (default: the heuristic's own grid).

    ``study.seconds`` is what measuring it cost, also when it came from the cache, so a search
    that reuses it is still charged for it. ``on_progress(done, total)`` follows the entries
    measured (a progress bar: ``agents.progress.count_bar``).
    """
    study = SensitivityStudy(proxy, methods=methods, levels=levels)
    study.seconds = 0.0
    path = study_path(proxy, study)
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            study.results = {(int(i), m, float(lv)): float(a) for i, m, lv, a in saved["rows"]}
            study.seconds = float(saved["seconds"])
            done, keys = len(study.results), len(study.keys())
            if done < keys:
                log.info(
                    "sensitivity study: %d of %d measured in %s; the rest now", done, keys, path
                )
            else:
                log.info("sensitivity study: cached %s", path)
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("ignoring unusable cached study %s (%s)", path, exc)
    t0 = time.perf_counter()
    seconds_before, last_save = study.seconds, [t0]

    total = len(study.keys())

    def save(every: float = STUDY_SAVE_EVERY_S) -> None:
        if on_progress is not None:
            on_progress(len(study.results), total)
        now = time.perf_counter()
        if now - last_save[0] < every:
            return
        last_save[0] = now
        study.seconds = seconds_before + now - t0
        rows = [[i, m, lv, a] for (i, m, lv), a in study.results.items()]
        try:
            write_json_atomic(path, {"rows": rows, "seconds": study.seconds})
        except OSError as exc:  # a full or read-only cache costs only time
            log.warning("could not cache the sensitivity study at %s (%s)", path, exc)

    measured_before = len(study.results)
    try:
        study.run(on_result=save)  # partial studies are saved too: Ctrl-C keeps what was measured
    except KeyboardInterrupt:
        if len(study.results) > measured_before:
            save(every=0.0)  # up to the last layer measured, not the last timed save
        raise
    if len(study.results) > measured_before or not path.exists():
        save(every=0.0)
    return study
