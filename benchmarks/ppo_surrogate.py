"""How fast does the PPO agent learn, on a reward that costs nothing to evaluate?

The real proxy costs seconds per episode, so tuning the agent against it is slow and noisy. Here
the environment is the real one (`MixedDecompositionEnv`: budget wall, observations, actions) on a
real VGG structure, but the proxy is replaced by a synthetic, seeded accuracy: each decomposed
layer ``i`` costs ``0.01 * s_i * m * log2(layer ratio)^2`` points (``s_i`` a random per-layer
sensitivity in [0.2, 2], 4x for the first layer; ``m`` 1.0 for Tucker-2, 1.3 for CP). Every
strategy gets the same number of episodes; the table gives the best reward found (what a search
returns) and the mean reward of the last 40 episodes (what the policy has learned), averaged over
seeds. Random search draws uniform actions through the same wall.

    python benchmarks/ppo_surrogate.py --target 8 --episodes 100 --seeds 10
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import numpy as np
import torch
from stable_baselines3.common.vec_env import DummyVecEnv

from agents.callbacks import SearchCallback
from agents.ppo import PPOConfig, make_ppo
from envs import EnvConfig, MixedDecompositionEnv
from rl_mtd.data import load_cifar10, make_splits
from rl_mtd.decompose import FactorCache, conv_layers
from rl_mtd.errors import exit_on_user_error
from rl_mtd.metrics import count_params
from rl_mtd.models import build_vgg
from rl_mtd.policy import Policy, apply_policy
from rl_mtd.proxy import Proxy, ProxyConfig, ProxyResult

METHOD_COST = {"tucker2": 1.0, "cp": 1.3}


class SurrogateProxy(Proxy):
    """A proxy whose accuracy is a fixed additive function of the policy (no data, no factors)."""

    def __init__(self, *args, sensitivity: np.ndarray, **kwargs):
        super().__init__(*args, **kwargs)
        self.sensitivity = sensitivity

    def evaluate(self, policy: Policy) -> ProxyResult:
        penalty = sum(
            0.01 * self.sensitivity[i] * METHOD_COST[c.method] * math.log2(max(c.ratio, 1.0)) ** 2
            for i, c in enumerate(policy.layers)
            if c.method != "keep"
        )
        params = count_params(apply_policy(self.model, policy, factorize=False))
        return ProxyResult(
            accuracy=0.9 - penalty,
            compression_ratio=self.params_original / params,
            macs_ratio=1.0,
            params=params,
            macs=1,
            seconds=0.0,
        )


def run_random(env: MixedDecompositionEnv, episodes: int, seed: int) -> list[float]:
    env.action_space.seed(seed)
    rewards = []
    for e in range(episodes):
        env.reset(seed=seed * 100_000 + e)
        done, reward = False, 0.0
        while not done:
            _, reward, done, _, _ = env.step(int(env.action_space.sample()))
        rewards.append(float(reward))
    return rewards


def run_ppo(env: MixedDecompositionEnv, episodes: int, seed: int, cfg: PPOConfig) -> list[float]:
    venv = DummyVecEnv([lambda: env])
    with tempfile.TemporaryDirectory() as run_dir:
        agent = make_ppo(venv, env.num_layers, config=cfg, seed=seed)
        callback = SearchCallback(run_dir, max_episodes=episodes)
        agent.learn(episodes * env.num_layers * 4, callback=callback)
        return [float(e["reward"]) for e in callback.episodes]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", default="vgg11")
    p.add_argument("--target", type=float, default=8.0)
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2", help="PPO learning rates to compare")
    args = p.parse_args()
    torch.set_num_threads(1)
    splits = make_splits(load_cifar10("synthetic:300,100"), proxy_size=100, seed=0)
    torch.manual_seed(0)
    model = build_vgg(args.net, width=0.25)
    sensitivity = np.random.default_rng(0).uniform(0.2, 2.0, size=len(conv_layers(model)))
    sensitivity[0] *= 4
    proxy = SurrogateProxy(
        model,
        train_split=splits.train,
        proxy_split=splits.proxy,
        device="cpu",
        config=ProxyConfig(bn_batches=0),
        cache=FactorCache(),
        net=args.net,
        width=0.25,
        sensitivity=sensitivity,
    )
    default = PPOConfig()
    strategies: dict[str, PPOConfig | None] = {"random": None}
    for lr in (float(x) for x in args.lrs.split(",")):
        tag = " (default)" if lr == default.learning_rate else ""
        strategies[f"ppo lr {lr:g}{tag}"] = PPOConfig(learning_rate=lr)
    print(
        f"{args.net}, target {args.target:g}x, {args.episodes} episodes, mean over "
        f"{args.seeds} seeds\n"
    )
    print("| strategy | best reward | mean reward, last 40 episodes | seconds |")
    print("|-|-:|-:|-:|")
    for name, cfg in strategies.items():
        t0 = time.perf_counter()
        best, last = [], []
        for seed in range(args.seeds):
            env = MixedDecompositionEnv(proxy, EnvConfig(target_ratio=args.target))
            rewards = (
                run_random(env, args.episodes, seed)
                if cfg is None
                else run_ppo(env, args.episodes, seed, cfg)
            )
            best.append(max(rewards))
            last.append(float(np.mean(rewards[-40:])))
        print(
            f"| {name} | {np.mean(best):.4f} | {np.mean(last):.4f} | "
            f"{time.perf_counter() - t0:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    exit_on_user_error(main)
