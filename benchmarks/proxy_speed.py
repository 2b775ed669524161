"""Seconds per proxy episode and search episodes per minute, with a warm factor cache.

The weights do not change the cost of an episode, so the net is freshly initialised unless
``--checkpoint`` is given. Steps: (1) factorise every (layer, method, level) option once (the
cold cost, reported); (2) time proxy evaluations of random policies on a fresh Proxy (no memo,
warm factors); (3) run a short PPO search and count episodes per minute; (4) time
``--time-repair-steps`` repair steps on one compressed net, for the cost of the proxy repair
(``--repair-steps``; 0 times the BN-only proxy in (2) and (3)).

    python benchmarks/proxy_speed.py --net vgg16 --width 1 --proxy-size 2000 \
        --data ../shared/data/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

from _common import add_proxy_args, machine, prefill_factors, proxy_config

from agents.presets import REPAIR_STEPS
from rl_mtd.baselines import random_policies
from rl_mtd.checkpoints import load_baseline
from rl_mtd.data import load_cifar10, make_splits
from rl_mtd.decompose import conv_layers
from rl_mtd.errors import exit_on_user_error
from rl_mtd.models import build_vgg
from rl_mtd.proxy import Proxy, resolve_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", default="vgg16")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--data", default=None)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--proxy-size", type=int, default=2000)
    add_proxy_args(p)
    p.add_argument("--target", type=float, default=32.0)
    p.add_argument("--policies", type=int, default=3, help="timed proxy evaluations")
    p.add_argument("--episodes", type=int, default=4, help="episodes of the timed PPO search")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--time-repair-steps",
        type=int,
        default=10,
        help="repair steps timed in step (4) (0: skip it)",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    splits = make_splits(load_cifar10(args.data), proxy_size=args.proxy_size, seed=0).to(device)
    if args.checkpoint:
        model, _ = load_baseline(args.checkpoint, net=args.net, width=args.width)
    else:
        model = build_vgg(args.net, width=args.width)
    model = model.to(device).eval()

    convs = [c for _, c in conv_layers(model)]
    warm_s, n_fact = prefill_factors(model)

    cfg = proxy_config(args)
    proxy = Proxy(
        model,
        train_split=splits.train,
        proxy_split=splits.proxy,
        device=device,
        config=cfg,
        net=args.net,
        width=args.width,
    )
    times = []
    policies = random_policies(
        model, args.target, args.policies, seed=1, net=args.net, width=args.width, settled=False
    )
    for policy in policies:
        times.append(proxy.evaluate(policy).seconds)

    from stable_baselines3.common.vec_env import DummyVecEnv

    from agents.callbacks import SearchCallback
    from agents.ppo import make_ppo
    from envs import EnvConfig, MixedDecompositionEnv

    search_proxy = Proxy(
        model,
        train_split=splits.train,
        proxy_split=splits.proxy,
        device=device,
        config=cfg,
        net=args.net,
        width=args.width,
    )
    env_cfg = EnvConfig(target_ratio=args.target)
    venv = DummyVecEnv([lambda: MixedDecompositionEnv(search_proxy, env_cfg)])
    with tempfile.TemporaryDirectory() as run_dir:
        agent = make_ppo(venv, len(convs), seed=0)
        callback = SearchCallback(run_dir, max_episodes=args.episodes)
        t1 = time.perf_counter()
        agent.learn(args.episodes * len(convs) * 4, callback=callback)
        search_s = time.perf_counter() - t1
        n_eps = len(callback.episodes)

    repair_row = ""
    if args.time_repair_steps > 0:
        timing = Proxy(
            model,
            train_split=splits.train,
            proxy_split=splits.proxy,
            device=device,
            config=proxy_config(args, repair_steps=args.time_repair_steps),
            net=args.net,
            width=args.width,
        )
        (policy,) = random_policies(
            model, args.target, 1, seed=2, net=args.net, width=args.width, settled=False
        )
        timing.repair(timing.compress(policy))  # warm-up: first-call kernel setup is not a step
        compressed = timing.compress(policy)
        t2 = time.perf_counter()
        timing.repair(compressed)
        per_step = (time.perf_counter() - t2) / args.time_repair_steps
        steps = args.repair_steps or REPAIR_STEPS
        repair_row = (
            f"| proxy repair: seconds per SGD step (batch {timing.config.repair.batch_size}"
            f", mean of {args.time_repair_steps}) | {per_step:.3f} s; {steps} steps add "
            f"{steps * per_step:.0f} s per episode |\n"
        )

    print(f"machine: {machine()}; device {device}")
    print(
        f"| what | value |\n|-|-|\n"
        f"| net | {args.net} width {args.width:g}, {len(convs)} conv layers |\n"
        f"| proxy split / BN batches / repair steps | {len(splits.proxy)} images / "
        f"{args.bn_batches} x 128 / {args.repair_steps} |\n"
        f"| cold: factorise all {n_fact} (layer, method, level) options once | {warm_s:.1f} s |\n"
        f"| proxy seconds per episode, warm cache (median of {len(times)}) | "
        f"{statistics.median(times):.2f} s |\n"
        f"| PPO search: {n_eps} episodes in {search_s:.1f} s | "
        f"{60 * n_eps / search_s:.2f} episodes/min |\n{repair_row}",
        end="",
    )


if __name__ == "__main__":
    exit_on_user_error(main)
