"""The whole job: data -> baseline -> search (or replay) -> apply -> fine-tune -> test -> report.

Everything that can be wrong with the input (net, checkpoint, policy or agent file, data, target,
run directory) is checked before any long work starts and before the run directory is touched.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agents.config import RunConfig
from envs.mixed_decomposition import EnvConfig, MixedDecompositionEnv
from rl_mtd.checkpoints import load_baseline, save_baseline
from rl_mtd.data import Cifar, DataSplits, load_cifar10, make_splits
from rl_mtd.decompose import conv_layers, layer_params
from rl_mtd.errors import RlMtdError
from rl_mtd.io import cache_dir, write_json_atomic
from rl_mtd.metrics import count_macs, count_params, measure_latency
from rl_mtd.models import build_vgg, check_net_name
from rl_mtd.policy import Policy, save_compressed
from rl_mtd.proxy import Proxy, ProxyConfig, resolve_device
from rl_mtd.train import TrainConfig, evaluate, reestimate_bn, train

log = logging.getLogger("rl_mtd")


# ----------------------------------------------------------------------------- validation


@dataclass
class Replay:
    kind: str  # "policy" or "agent"
    path: Path
    policy: Policy | None = None
    meta: dict[str, Any] | None = None


def env_config(cfg: RunConfig) -> EnvConfig:
    return EnvConfig(methods=cfg.methods, levels=cfg.levels, target_ratio=cfg.target_ratio)


def validate(cfg: RunConfig) -> Replay | None:
    """Cheap checks of every input, before data, training or the run directory."""
    check_net_name(cfg.net)
    if not cfg.width > 0:
        raise RlMtdError(f"--width must be > 0, got {cfg.width}")
    if cfg.target_ratio is not None and not cfg.target_ratio > 1:
        raise RlMtdError(f"--target-ratio must be > 1 (a compression factor), got {cfg.target_ratio}")
    env_config(cfg)  # methods and levels
    if cfg.n_envs < 1:
        raise RlMtdError(f"--n-envs must be >= 1, got {cfg.n_envs}")
    if cfg.bn_batches < 0 or cfg.repair_steps < 0:
        raise RlMtdError(f"--bn-batches and --repair-steps must be >= 0, got {cfg.bn_batches} "
                         f"and {cfg.repair_steps}")  # fmt: skip
    if cfg.checkpoint is not None and not Path(cfg.checkpoint).is_file():
        raise RlMtdError(f"--checkpoint {cfg.checkpoint} does not exist")
    if cfg.resume is None and cfg.out is not None and Path(cfg.out).exists() and not cfg.overwrite:
        raise RlMtdError(
            f"output directory {cfg.out} already exists; pass another --out, or --overwrite to "
            "write into it"
        )
    if cfg.replay is None:
        return None
    path = Path(cfg.replay)
    if path.suffix == ".zip":
        from agents.ppo import read_agent_meta

        meta = read_agent_meta(path)
        _check_same_net(cfg, meta["net"], meta["width"], f"agent {path}")
        return Replay("agent", path, meta=meta)
    policy = Policy.load(path)
    _check_same_net(cfg, policy.net, policy.width, f"policy {path}")
    return Replay("policy", path, policy=policy)


def _check_same_net(cfg: RunConfig, net: str, width: float, what: str) -> None:
    if net != cfg.net or float(width) != float(cfg.width):
        raise RlMtdError(
            f"{what} was made for {net} at width {width}, but this run is {cfg.net} at width "
            f"{cfg.width}; pass --net {net} --width {width} with a matching --checkpoint"
        )


# ----------------------------------------------------------------------------- stages


def load_data(cfg: RunConfig) -> tuple[DataSplits, Cifar]:
    """Load the dataset and split it; size caps above what the data holds mean "all of it"."""
    data = load_cifar10(cfg.data, progress=cfg.progress)
    if cfg.proxy_size >= len(data.train):
        raise RlMtdError(
            f"--proxy-size {cfg.proxy_size} leaves no training images ({len(data.train)} in "
            f"{data.source}); pass a smaller --proxy-size"
        )
    available = len(data.train) - cfg.proxy_size
    train_size = _cap("train", cfg.train_size, available)
    test_size = _cap("test", cfg.test_size, len(data.test))
    splits = make_splits(data, proxy_size=cfg.proxy_size, seed=cfg.seed, train_size=train_size,
                         test_size=test_size)  # fmt: skip
    return splits, data


def _cap(what: str, size: int | None, available: int) -> int | None:
    if size is not None and size > available:
        log.warning("only %d %s images available; using all of them (asked for %d)",
                    available, what, size)  # fmt: skip
        return None
    return size


def baseline_cache_path(cfg: RunConfig, data_key: str) -> Path:
    """Where a trained baseline for these settings is cached."""
    spec = json.dumps([cfg.net, cfg.width, data_key, cfg.train_size, cfg.proxy_size, cfg.seed,
                       cfg.baseline_epochs, cfg.lr, cfg.batch_size], sort_keys=True)  # fmt: skip
    digest = hashlib.sha256(spec.encode()).hexdigest()[:16]
    return cache_dir() / "baselines" / f"{cfg.net}-w{cfg.width:g}-{digest}.pt"


def get_baseline(
    cfg: RunConfig, splits: DataSplits, data_key: str, device: torch.device
) -> tuple[nn.Module, str]:
    """The baseline: ``--checkpoint``, a cached one for these settings, or train one now."""
    if cfg.checkpoint is not None:
        model, _ = load_baseline(cfg.checkpoint, net=cfg.net, width=cfg.width)
        return model.to(device), str(cfg.checkpoint)
    path = baseline_cache_path(cfg, data_key)
    if path.exists():
        try:
            model, _ = load_baseline(path, net=cfg.net, width=cfg.width)
            log.info("baseline: cached %s", path)
            return model.to(device), str(path)
        except RlMtdError as exc:
            log.warning("ignoring unusable cached baseline (%s); training a new one", exc)
    log.info("baseline: training %s width %g for %g epochs on %d images", cfg.net, cfg.width,
             cfg.baseline_epochs, len(splits.train))  # fmt: skip
    torch.manual_seed(cfg.seed)  # before building: the initial weights come from this seed
    model = build_vgg(cfg.net, width=cfg.width).to(device)
    train(model, splits.train, val_split=splits.proxy if len(splits.proxy) else None,
          config=TrainConfig(epochs=cfg.baseline_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                             seed=cfg.seed, label_smoothing=0.1),
          progress=cfg.progress, desc="baseline")  # fmt: skip
    save_baseline(path, model, net=cfg.net, width=cfg.width,
                  meta={"epochs": cfg.baseline_epochs, "data": data_key})  # fmt: skip
    return model, str(path)


def _time_per_train_step(model: nn.Module, splits: DataSplits, cfg: RunConfig) -> float:
    """Seconds per training step, from a few steps on a throwaway copy."""
    probe = copy.deepcopy(model)
    n = min(len(splits.train), cfg.batch_size * 4)
    sub = type(splits.train)(splits.train.x[:n], splits.train.y[:n])
    bs = min(cfg.batch_size, n)
    steps = max(1, n // bs)
    tcfg = TrainConfig(epochs=1 / steps, batch_size=bs)
    train(probe, sub, config=tcfg, progress=False)  # warm-up: first calls are slow
    t0 = time.perf_counter()
    train(probe, sub, config=TrainConfig(epochs=1, batch_size=bs), progress=False)
    return (time.perf_counter() - t0) / steps


def print_plan(cfg: RunConfig, splits: DataSplits, device: torch.device, n_layers: int,
               t_step: float, t_episode: float, need_baseline: bool, replay: Replay | None) -> None:  # fmt: skip
    steps_per_epoch = max(1, len(splits.train) // cfg.batch_size)
    est = {
        "baseline": cfg.baseline_epochs * steps_per_epoch * t_step if need_baseline else 0.0,
        "search": 0.0 if replay else cfg.episodes * t_episode,
        "fine-tune": cfg.finetune_epochs * steps_per_epoch * t_step * 1.3,
    }
    lines = [
        f"plan: {cfg.net} width {cfg.width:g} on {device}, preset {cfg.preset}, seed {cfg.seed}",
        f"  data: {len(splits.train)} train / {len(splits.proxy)} proxy / {len(splits.test)} test",
        f"  1. baseline: {'train ' + format(cfg.baseline_epochs, 'g') + ' epochs' if need_baseline else 'given'}"
        f"  (~{_fmt(est['baseline'])})",
        ("  2. search: replay " + str(replay.path)) if replay else
        f"  2. search: {cfg.episodes} episodes x {n_layers} layers, target "
        f"{cfg.target_ratio or 'trade-off'}, {cfg.n_envs} env(s), proxy {cfg.bn_batches} BN "
        f"batches + {cfg.repair_steps} repair steps (~{_fmt(est['search'])}, "
        f"plus factorising each new layer option once; repeated policies are faster)",
        f"  3. fine-tune {cfg.finetune_epochs:g} epochs (~{_fmt(est['fine-tune'])}), then test",
        f"  estimated total ~{_fmt(sum(est.values()))} (from timing {t_step * 1e3:.0f} ms/step, "
        f"{t_episode:.1f} s/episode on this device)",
    ]  # fmt: skip
    for line in lines:
        log.info(line)
    if device.type == "cpu" and cfg.preset == "paper":
        log.warning("a paper-scale run without a GPU takes days; consider --preset cpu")


def _fmt(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ----------------------------------------------------------------------------- search


def _make_env(proxy: Proxy, env_cfg: EnvConfig):
    from stable_baselines3.common.monitor import Monitor

    return Monitor(MixedDecompositionEnv(proxy, env_cfg))


def proxy_config(cfg: RunConfig) -> ProxyConfig:
    """The proxy settings of a run (one place, so every environment scores alike)."""
    return ProxyConfig(bn_batches=cfg.bn_batches, repair_steps=cfg.repair_steps,
                       repair_batch_size=cfg.batch_size, seed=cfg.seed)  # fmt: skip


def _subproc_env(cfg_dict: dict[str, Any], baseline_path: str, rank: int):
    """Build an env in a worker process: its own data copy, baseline and proxy (own GPU if any)."""
    from stable_baselines3.common.monitor import Monitor

    cfg = RunConfig.from_dict(cfg_dict)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        device = torch.device(f"cuda:{rank % torch.cuda.device_count()}")
    splits, _ = load_data(cfg)
    model, _ = load_baseline(baseline_path, net=cfg.net, width=cfg.width)
    proxy = Proxy(model, train=splits.train, proxy=splits.proxy, device=device,
                  config=proxy_config(cfg), net=cfg.net,
                  width=cfg.width)  # fmt: skip
    return Monitor(MixedDecompositionEnv(proxy, env_config(cfg)))


def search(
    cfg: RunConfig, proxy: Proxy, run_dir: Path, baseline_path: str
) -> tuple[Policy, dict[str, Any], float]:
    """PPO search; returns the best policy, the search state and seconds spent."""
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    from agents.callbacks import SearchCallback
    from agents.ppo import PPOConfig, load_agent, make_ppo, save_agent

    env_cfg = env_config(cfg)
    n_layers = len(proxy.convs)
    if cfg.n_envs > 1:
        fns = [partial(_subproc_env, cfg.to_dict(), baseline_path, i) for i in range(cfg.n_envs)]
        venv = SubprocVecEnv(fns)
    else:
        venv = DummyVecEnv([partial(_make_env, proxy, env_cfg)])
    state: dict[str, Any] = {}
    agent_path = run_dir / "agent.zip"
    if cfg.resume is not None and agent_path.exists():
        agent = load_agent(agent_path)
        agent.set_env(venv)
        state_file = run_dir / "search_state.json"
        if state_file.exists():
            state = json.loads(state_file.read_text())
        log.info("resuming: %d episodes done", len(state.get("episodes", [])))
    else:
        agent = make_ppo(venv, n_layers, config=PPOConfig(), seed=cfg.seed,
                         tensorboard_log=str(run_dir / "tb"))  # fmt: skip
    done_before = len(state.get("episodes", []))
    timesteps = cfg.timesteps or max(1, cfg.episodes - done_before) * n_layers
    hparams = {**{k: v for k, v in cfg.to_dict().items() if k != "argv"},
               **{f"ppo.{k}": v for k, v in PPOConfig().to_dict().items()}}  # fmt: skip
    callback = SearchCallback(run_dir, hparams=hparams, state=state,
                              max_episodes=None if cfg.timesteps else cfg.episodes)  # fmt: skip
    meta = {"net": cfg.net, "width": cfg.width, "methods": list(cfg.methods),
            "levels": list(cfg.levels), "target_ratio": cfg.target_ratio,
            "num_classes": proxy.num_classes}  # fmt: skip
    t0 = time.perf_counter()
    interrupted = False
    try:
        agent.learn(timesteps, callback=callback, tb_log_name="search",
                    reset_num_timesteps=cfg.resume is None, progress_bar=False)  # fmt: skip
    except KeyboardInterrupt:
        interrupted = True
    finally:
        seconds = time.perf_counter() - t0 + float(state.get("seconds", 0.0))
        save_agent(agent, agent_path, meta)
        write_json_atomic(run_dir / "search_state.json", {**callback.state(), "seconds": seconds})
        venv.close()
    if callback.best is None:
        raise RlMtdError("the search ended before its first episode finished; nothing to apply")
    if interrupted and not _continue_after_interrupt(cfg, run_dir):
        raise SystemExit(130)
    return Policy.from_dict(callback.best["policy"]), callback.state(), seconds


def _continue_after_interrupt(cfg: RunConfig, run_dir: Path) -> bool:
    log.warning("search interrupted; the agent and the best policy so far are saved in %s "
                "(continue later with --resume %s)", run_dir, run_dir)  # fmt: skip
    if cfg.on_interrupt == "report":
        return True
    if cfg.on_interrupt == "ask" and sys.stdin is not None and sys.stdin.isatty():
        try:
            answer = input("fine-tune and report the best policy so far? [y/N] ")
        except (EOFError, KeyboardInterrupt):
            return False
        return answer.strip().lower() in ("y", "yes")
    return False


def replay_agent(cfg: RunConfig, replay: Replay, proxy: Proxy) -> Policy:
    """Run a saved agent deterministically through an env on this checkpoint."""
    from agents.ppo import load_agent

    meta = replay.meta or {}
    env = MixedDecompositionEnv(proxy, EnvConfig(
        methods=tuple(meta["methods"]), levels=tuple(meta["levels"]),
        target_ratio=meta.get("target_ratio")))  # fmt: skip
    agent = load_agent(replay.path)
    if agent.action_space != env.action_space or agent.observation_space != env.observation_space:
        raise RlMtdError(f"agent {replay.path} does not fit this environment (spaces differ)")
    obs, _ = env.reset(seed=cfg.seed)
    done = False
    while not done:
        action, _ = agent.predict(obs, deterministic=True)
        obs, _, done, _, _ = env.step(int(action))
    return env.current_policy()


# ----------------------------------------------------------------------------- the run


def default_out(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.net}-{datetime.now():%Y%m%d-%H%M%S}"


def run(cfg: RunConfig) -> dict[str, Any]:
    """Run the whole job and return report.json's content."""
    if cfg.resume is not None:
        cfg = _resume_config(cfg)
    replay = validate(cfg)
    device = resolve_device(cfg.device)
    splits, data = load_data(cfg)
    source, data_key = data.source, data.key
    splits = splits.to(device)
    run_dir = Path(cfg.out) if cfg.out else default_out(cfg)
    need_baseline = cfg.checkpoint is None and not baseline_cache_path(cfg, data_key).exists()
    # Time this device on a fresh model of the same shape, so the plan comes before long work.
    probe = build_vgg(cfg.net, width=cfg.width).to(device)
    t_step = _time_per_train_step(probe, splits, cfg)
    t_episode = _time_episode(probe, splits, cfg) if replay is None else 0.0
    t_episode += cfg.repair_steps * t_step if replay is None else 0.0
    n_layers = len(conv_layers(probe))
    del probe
    print_plan(cfg, splits, device, n_layers, t_step, t_episode, need_baseline, replay)
    baseline, baseline_path = get_baseline(cfg, splits, data_key, device)

    proxy = Proxy(baseline, train=splits.train, proxy=splits.proxy, device=device,
                  config=proxy_config(cfg), net=cfg.net,
                  width=cfg.width)  # fmt: skip
    if replay is None or replay.kind == "policy":
        MixedDecompositionEnv(proxy, env_config(cfg))  # raises if the target is out of reach

    if cfg.resume is None:
        if run_dir.exists() and cfg.overwrite:
            for stale in ("tb", "episodes.jsonl", "search_state.json"):
                target = run_dir / stale
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", {**cfg.to_dict(), "out": str(run_dir),
                      "resolved_device": str(device), "baseline_path": baseline_path})  # fmt: skip

    baseline_acc = evaluate(baseline, splits.test)
    log.info("baseline: test accuracy %.2f%%, proxy accuracy %.2f%%", 100 * baseline_acc,
             100 * proxy.baseline_acc)  # fmt: skip
    episodes: list[dict[str, Any]] = []
    search_seconds = 0.0
    t0 = time.perf_counter()
    if replay is None:
        policy, state, search_seconds = search(cfg, proxy, run_dir, baseline_path)
        episodes = state["episodes"]
    elif replay.kind == "policy":
        policy = replay.policy  # type: ignore[assignment]
        policy.save(run_dir / "policy.json")
    else:
        policy = replay_agent(cfg, replay, proxy)
        policy.save(run_dir / "policy.json")
        search_seconds = time.perf_counter() - t0
    proxy_result = proxy.evaluate(policy)
    log.info("best policy: %.2fx parameters, proxy accuracy %.2f%%",
             proxy_result.compression_ratio, 100 * proxy_result.accuracy)  # fmt: skip

    compressed, ft = finetune(cfg, proxy, policy, baseline, splits)
    finetuned_acc = evaluate(compressed, splits.test)
    save_compressed(run_dir / "compressed.pt", compressed, policy,
                    meta={"finetuned_acc": finetuned_acc})  # fmt: skip
    report = build_report(cfg, device, source, baseline, compressed, policy, baseline_acc,
                          proxy, proxy_result.accuracy, finetuned_acc, search_seconds,
                          ft.seconds, episodes, ft.recoveries)  # fmt: skip
    write_outputs(run_dir, report, episodes)
    log.info("done: %.2fx fewer parameters, test accuracy %.2f%% (baseline %.2f%%) -> %s",
             report["compression_ratio"], 100 * finetuned_acc, 100 * baseline_acc, run_dir)  # fmt: skip
    return report


def _resume_config(cfg: RunConfig) -> RunConfig:
    run_dir = Path(cfg.resume)  # type: ignore[arg-type]
    saved = run_dir / "config.json"
    if not saved.exists() or not (run_dir / "agent.zip").exists():
        raise RlMtdError(f"--resume {run_dir}: no config.json and agent.zip there to resume from")
    saved_dict = json.loads(saved.read_text())
    old = RunConfig.from_dict(saved_dict)
    if "repair_steps" not in saved_dict:  # written before the proxy repair existed: score alike
        old.repair_steps = 0
    old.resume, old.out, old.argv = str(run_dir), str(run_dir), cfg.argv
    if cfg.episodes != old.episodes or cfg.timesteps:  # a longer search asked for
        old.episodes, old.timesteps = cfg.episodes, cfg.timesteps
    old.progress, old.on_interrupt = cfg.progress, cfg.on_interrupt
    return old


def _time_episode(model: nn.Module, splits: DataSplits, cfg: RunConfig) -> float:
    """Seconds of one proxy evaluation: copy the model, re-estimate BN, evaluate the proxy split."""
    t0 = time.perf_counter()
    probe = copy.deepcopy(model)
    if cfg.bn_batches:
        reestimate_bn(probe, splits.train, batches=cfg.bn_batches)
    if len(splits.proxy):
        evaluate(probe, splits.proxy)
    return time.perf_counter() - t0


def finetune(cfg: RunConfig, proxy: Proxy, policy: Policy, baseline: nn.Module,
             splits: DataSplits):  # fmt: skip
    compressed = proxy.compress(policy)
    tcfg = TrainConfig(epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, batch_size=cfg.batch_size,
                       schedule="cosine", kd_alpha=cfg.kd, seed=cfg.seed,
                       evals_per_epoch=2)  # fmt: skip
    teacher = baseline if cfg.kd > 0 else None
    result = train(compressed, splits.train, config=tcfg,
                   val_split=splits.proxy if len(splits.proxy) else None, teacher=teacher,
                   progress=cfg.progress, desc="fine-tune")  # fmt: skip
    return compressed.eval(), result


def build_report(cfg, device, source, baseline, compressed, policy, baseline_acc, proxy,
                 proxy_acc, finetuned_acc, search_seconds, finetune_seconds, episodes,
                 recoveries) -> dict[str, Any]:  # fmt: skip
    from agents.report import layer_rows

    rows = layer_rows(baseline, compressed, policy)
    conv_before = sum(layer_params(c) for _, c in conv_layers(baseline))
    conv_after = sum(r["params"] for r in rows)
    params_o, params_c = count_params(baseline), count_params(compressed)
    report: dict[str, Any] = {
        "net": cfg.net, "width": cfg.width, "dataset": source, "device": str(device),
        "seed": cfg.seed, "target_ratio": cfg.target_ratio,
        "mode": "budget" if cfg.target_ratio else "trade-off",
        "replay": cfg.replay,
        "baseline_acc": baseline_acc, "baseline_proxy_acc": proxy.baseline_acc,
        "proxy_bn_batches": proxy.config.bn_batches, "proxy_repair_steps": proxy.config.repair_steps,
        "proxy_acc": proxy_acc, "finetuned_acc": finetuned_acc,
        "accuracy_drop": baseline_acc - finetuned_acc,
        "accuracy_units": "fraction of the test split (0..1)",
        "params_original": params_o, "params_compressed": params_c,
        "compression_ratio": params_o / params_c,
        "conv_params_original": conv_before, "conv_params_compressed": conv_after,
        "conv_compression_ratio": conv_before / max(1, conv_after),
        "macs_original": count_macs(baseline), "macs_compressed": count_macs(compressed),
        "search_seconds": search_seconds, "finetune_seconds": finetune_seconds,
        "finetune_recoveries": recoveries, "episodes": len(episodes),
        "proxy_evaluations": proxy.evaluations,
        "layers": [{"name": r["name"], "method": r["method"], "rank": r["rank"],
                    "params": r["params"], "macs": r["macs"], "params_before": r["params_before"],
                    "macs_before": r["macs_before"]} for r in rows],
    }  # fmt: skip
    report.update(_latency(cfg, device, baseline, compressed))
    return report


def _latency(cfg: RunConfig, device: torch.device, baseline: nn.Module,
             compressed: nn.Module) -> dict[str, Any]:  # fmt: skip
    out = {}
    for bs in (1, 128):
        kw = {"batch_size": bs, "device": device, "repeats": cfg.latency_repeats,
              "warmup": max(1, cfg.latency_repeats // 4)}  # fmt: skip
        a = measure_latency(baseline, **kw)["median_ms"]
        b = measure_latency(compressed, **kw)["median_ms"]
        out[f"latency_b{bs}"] = {"device": str(device), "original_ms": a, "compressed_ms": b,
                                 "speedup": a / b if b > 0 else math.nan}  # fmt: skip
    return out


def write_outputs(run_dir: Path, report: dict[str, Any], episodes: list[dict[str, Any]]) -> None:
    from agents.report import plot_layers, plot_rewards, write_markdown

    rows = report["layers"]
    write_json_atomic(run_dir / "report.json", report)
    write_markdown(run_dir / "report.md", report)
    plot_rewards(run_dir / "reward_curve.png", episodes)
    plot_layers(run_dir / "layers.png", rows)

