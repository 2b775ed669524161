"""The search stage: environments and the PPO search with resume.

Nothing here prompts or exits: an interrupted search returns ``interrupted=True`` and the caller
(the CLI) decides what happens next.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from agents.config import RunConfig
from agents.inputs import latency_model
from agents.search_state import (  # noqa: F401  (re-exported: where callers import them)
    SearchResult,
    finished_search,
    read_search_state,
    search_finished,
    what_is_left,
)
from envs.mixed_decomposition import EnvConfig, MixedDecompositionEnv
from rl_mtd.checkpoints import load_baseline
from rl_mtd.data import DataSplits
from rl_mtd.decompose import RANK_RULE
from rl_mtd.errors import RlMtdError
from rl_mtd.io import write_json_atomic, write_text_atomic
from rl_mtd.policy import Policy
from rl_mtd.proxy import Proxy, ProxyConfig, default_repair, resolve_device
from rl_mtd.settle import SettlePoints, settle_of

log = logging.getLogger("rl_mtd")

SAVE_EVERY = 5
"""Episodes between saves of the agent and the search state (and at every new best), so a
search killed hard loses at most this many episodes."""


def env_config(cfg: RunConfig) -> EnvConfig:
    return EnvConfig(
        methods=cfg.methods,
        levels=cfg.levels,
        target_ratio=cfg.target_ratio,
        target_macs=cfg.target_macs,
        target_latency=cfg.target_latency,
    )


def proxy_config(cfg: RunConfig) -> ProxyConfig:
    """The proxy settings of a run (one place, so every environment scores alike)."""
    repair = replace(default_repair(), batch_size=cfg.batch_size)
    return ProxyConfig(
        bn_batches=cfg.bn_batches,
        repair_steps=cfg.repair_steps,
        repair=repair,
        seed=cfg.seed,
        fit=cfg.fit,
    )


def make_proxy(cfg: RunConfig, model: nn.Module, splits: DataSplits, device: torch.device) -> Proxy:
    """The run's scorer over ``model`` (the same settings in every process)."""
    return Proxy(
        model,
        train_split=splits.train,
        proxy_split=splits.proxy,
        device=device,
        config=proxy_config(cfg),
        net=cfg.net,
        width=cfg.width,
    )


def _make_env(proxy: Proxy, env_cfg: EnvConfig, scores: np.ndarray | None = None, latency=None):
    from stable_baselines3.common.monitor import Monitor

    return Monitor(
        MixedDecompositionEnv(proxy, env_cfg, layer_scores=scores, latency_model=latency)
    )


def _subproc_env(
    cfg_dict: dict[str, Any],
    baseline_path: str,
    rank: int,
    settle_first: tuple[int, ...] = (),
    settle_points: SettlePoints = (),
    threads: int | None = None,
):
    """Build an env in a worker process: its own data copy, baseline and proxy (own GPU if any).

    ``threads``: torch's intra-op threads on a CPU, the parent's share; a fresh worker would
    otherwise take one per core, and n workers would spin n times too many threads (two workers
    on a 2-core machine ran a 3-episode smoke search about 6x slower than with one each).
    """
    from agents.inputs import load_data

    cfg = RunConfig.from_dict(cfg_dict)
    device = resolve_device(cfg.device)
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        device = torch.device(f"cuda:{rank % torch.cuda.device_count()}")  # cuda:N stays there
    splits, _ = load_data(cfg)
    model, _ = load_baseline(baseline_path, net=cfg.net, width=cfg.width)
    proxy = make_proxy(cfg, model, splits, device)
    from agents.studies import layer_scores

    scores = layer_scores(cfg.observe, proxy, cfg.study_steps)
    env_cfg = replace(env_config(cfg), settle_first=settle_first, settle_points=settle_points)
    return _make_env(proxy, env_cfg, scores, latency_model(cfg, proxy.device))


def worker_evaluations(cfg: RunConfig, episodes: list[dict[str, Any]]) -> int:
    """Proxy evaluations made in ``--n-envs`` worker processes for ``episodes``: each worker
    scores with its own proxy, which the main process's count never sees (with one env the
    episodes are scored by the main proxy and counted there)."""
    if cfg.n_envs <= 1:
        return 0
    return sum(1 for e in episodes if not e.get("cached", False))


def search(
    cfg: RunConfig,
    proxy: Proxy,
    run_dir: Path,
    baseline_path: str,
    *,
    on_episode: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
) -> SearchResult:
    """PPO search, resumed from ``run_dir`` with ``cfg.resume``; saves as it goes.

    The agent, ``search_state.json`` and ``policy.json`` are written every ``SAVE_EVERY``
    episodes and at every new best, so a hard kill loses at most those episodes.
    """
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    from agents.callbacks import SearchCallback
    from agents.ppo import PPOConfig, load_agent, make_ppo, read_agent_meta, save_agent

    n_layers = len(proxy.convs)
    # Timed (or read from the cache) before the clock starts.
    latency = latency_model(cfg, proxy.device)
    # The sensitivity study (for --observe study and --warm-start sensitivity) is measured or
    # read from the cache before the clock starts; its full cost is charged to the search.
    study, study_seconds, scores = None, 0.0, None
    if cfg.measures_study:
        from agents.progress import count_bar
        from agents.studies import cached_study, study_proxy, study_settings

        try:
            with count_bar("sensitivity study", "eval", cfg.progress) as bar:
                # the workers below find it cached
                study = cached_study(study_proxy(proxy, cfg.study_steps), bar)
        except KeyboardInterrupt:
            log.warning(
                "sensitivity study interrupted; run_agent.py --resume %s measures only what "
                "it has not cached",
                run_dir,
            )
            raise
        study_seconds = study.seconds
        if cfg.observe == "study":
            scores = study.scores(proxy.baseline_acc)
    agent_path = run_dir / "agent.zip"
    env_cfg, start, start_seconds = env_config(cfg), None, 0.0
    if cfg.warm_start == "sensitivity":
        # The heuristic's policy (the study is at hand: a moment, unless the search's grid
        # needs a study of its own) decides how every episode settles (its study's points, or
        # its order), so its options replay to its very policy. A resumed search keeps the
        # settling its agent was trained with (a study measured again elsewhere may differ).
        from agents.warmstart import heuristic_start

        t_start = time.perf_counter()
        start = heuristic_start(proxy, env_cfg, study=study, latency_model=latency)
        start_seconds = time.perf_counter() - t_start
        how = settle_of(start[0].meta)
        if cfg.resume is not None and agent_path.exists():
            saved = settle_of(read_agent_meta(agent_path))
            if saved != how:
                log.warning(
                    "the heuristic now settles otherwise than its agent was trained with (a "
                    "study measured again, or another version): the resumed search keeps the "
                    "agent's"
                )
            how = saved
        env_cfg = replace(env_cfg, settle_first=how[0], settle_points=how[1])
    if cfg.n_envs > 1:
        fns = [
            partial(
                _subproc_env,
                cfg.to_dict(),
                baseline_path,
                i,
                env_cfg.settle_first,
                env_cfg.settle_points,
                max(1, torch.get_num_threads() // cfg.n_envs),
            )
            for i in range(cfg.n_envs)
        ]
        venv = SubprocVecEnv(fns)
    else:
        venv = DummyVecEnv([partial(_make_env, proxy, env_cfg, scores, latency)])
    state = read_search_state(run_dir) if cfg.resume is not None else {}
    fresh_agent = not (cfg.resume is not None and agent_path.exists())
    if not fresh_agent:
        agent = load_agent(agent_path)
        agent.set_env(venv)
        # The zip remembers the folder it was saved from; a copied or moved run logs here.
        agent.tensorboard_log = str(run_dir / "tb")
        log.info("resuming: %d episodes done", len(state.get("episodes", [])))
    else:
        agent = make_ppo(
            venv, n_layers, config=PPOConfig(), seed=cfg.seed, tensorboard_log=str(run_dir / "tb")
        )
    episodes_before = len(state.get("episodes", []))
    if fresh_agent and episodes_before:  # deleted, or lost with a copy of the run
        log.warning(
            "%s is missing: the search goes on with a new agent%s; the %d episodes done and "
            "the best policy so far are kept",
            agent_path,
            " cloned from the heuristic again" if cfg.warm_start == "sensitivity" else "",
            episodes_before,
        )
    seconds_before = float(state.get("seconds", 0.0))
    invocation = {"argv": list(cfg.argv), "episodes_before": episodes_before}
    invocations = [*state.get("invocations", []), invocation]
    timesteps = cfg.timesteps or max(1, cfg.episodes - episodes_before) * n_layers
    hparams = {
        **{k: v for k, v in cfg.to_dict().items() if k != "argv"},
        **{f"ppo.{k}": v for k, v in PPOConfig().to_dict().items()},
    }
    meta = {
        "net": cfg.net,
        "width": cfg.width,
        "methods": list(cfg.methods),
        "levels": list(cfg.levels),
        "target_ratio": cfg.target_ratio,
        "target_macs": cfg.target_macs,
        "target_latency": cfg.target_latency,
        "latency_batch": cfg.latency_batch,
        "num_classes": proxy.num_classes,
        "observe": cfg.observe,
        "rank_rule": RANK_RULE,
        "settle_first": list(env_cfg.settle_first),
        "settle_points": [[i, m, [list(p) for p in pts]] for i, m, pts in env_cfg.settle_points],
    }
    if study is not None:  # a replay of this agent measures (and checks) the same study
        meta["study_repair_steps"] = study.proxy.config.repair_steps
        meta["study_settings"] = study_settings(study.proxy)
    # Timing the layers for a latency budget is charged like the study: everything the model
    # holds, also when read from the cache (what it times later falls inside the clock).
    latency_seconds = latency.seconds if latency is not None else 0.0
    # An earlier invocation saved (before its first episode, too) has charged what comes
    # before the search: the latency model, the study and the heuristic's start.
    charged = bool(state.get("invocations"))
    if charged:
        latency_seconds = 0.0
        if study is None or study.evaluations == 0:  # unless measured anew (cache cleared)
            study_seconds = 0.0
    invocation["study_seconds"] = study_seconds
    # measured by the study's own proxy: not among the search's proxy_evaluations
    invocation["study_evaluations"] = study.evaluations if study is not None else 0
    invocation["latency_model_seconds"] = latency_seconds
    if charged:  # the heuristic made again for its order: its start was charged
        start_seconds = 0.0
    t0 = time.perf_counter() - study_seconds - latency_seconds - start_seconds
    interrupted = finished = False  # finished: learn() ran to its end (saved for --resume)

    def save() -> None:
        invocation["episodes"] = len(callback.episodes) - episodes_before
        invocation["proxy_evaluations"] = proxy.evaluations + worker_evaluations(
            cfg, callback.episodes[episodes_before:]
        )
        if imitate is not None:
            invocation["imitations"] = imitate.clones
            invocation["recentres"] = imitate.recentres
        seconds = seconds_before + time.perf_counter() - t0
        if latency is not None:
            latency.save()  # the blocks settling timed, for workers and the next run
        save_agent(agent, agent_path, meta)
        write_json_atomic(
            run_dir / "search_state.json",
            {
                **callback.state(),
                "seconds": seconds,
                "invocations": invocations,
                "finished": finished,
                **({"imitated": imitate.cloned} if imitate is not None else {}),
            },
        )

    callback = SearchCallback(
        run_dir,
        hparams=hparams,
        state=state,
        on_episode=on_episode,
        save=save,
        save_every=SAVE_EVERY,
        max_episodes=None if cfg.timesteps else cfg.episodes,
    )
    if cfg.warm_start == "sensitivity" and fresh_agent:
        from agents.warmstart import warm_start

        first = warm_start(
            proxy,
            env_cfg,
            agent,
            scores=scores,
            start=start,
            target_prob=cfg.warm_start_prob,
            latency_model=latency,
        )
        if not episodes_before:  # else the search's best so far stands
            invocation["warm_start"] = {
                k: first[k]
                for k in ("strategy", "study_evaluations", "study_seconds", "reward", "policy")
            }
            callback.best = first
            policy = first["policy"]
            write_json_atomic(
                run_dir / "policy.json",
                {**policy, "meta": {**policy.get("meta", {}), "warm_start": True}},
            )
    if episodes_before:  # a hard kill may have left episodes.jsonl ahead of the saved state
        write_text_atomic(
            run_dir / "episodes.jsonl", "".join(json.dumps(e) + "\n" for e in callback.episodes)
        )
    callbacks: list[Any] = [callback]
    imitate = None
    if cfg.imitate_best:
        from agents.warmstart import ImitateBest

        imitate = ImitateBest(
            lambda: callback.best,
            partial(
                MixedDecompositionEnv,
                proxy,
                env_cfg,
                layer_scores=scores,
                latency_model=latency,
            ),
            cfg.warm_start_prob,
            cloned=state.get("imitated"),
            fresh=lambda: sum(not e["cached"] for e in callback.episodes),
        )
        callbacks.append(imitate)
    if not episodes_before:
        # Saved before the first episode, so a hard kill in the first few (which a warm start's
        # best leaves unsaved until one beats it) leaves a search --resume can go on with.
        save()
    try:
        agent.learn(
            timesteps,
            callback=callbacks,
            tb_log_name="search",
            reset_num_timesteps=cfg.resume is None,
            progress_bar=False,
        )
        finished = True
    except KeyboardInterrupt:
        interrupted = True
    finally:
        save()
        venv.close()
    if callback.best is None:
        if interrupted:  # Ctrl-C before any episode: nothing to apply, but all to resume
            log.warning(
                "search interrupted before its first episode finished; the agent is saved in "
                "%s (continue later with --resume %s)",
                run_dir,
                run_dir,
            )
            raise KeyboardInterrupt
        raise RlMtdError("the search ended before its first episode finished; nothing to apply")
    return SearchResult(
        Policy.from_dict(callback.best["policy"]),
        callback.episodes,
        seconds_before + time.perf_counter() - t0,
        interrupted,
        invocations,
        best_reward=callback.best.get("reward"),
    )
