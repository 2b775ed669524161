"""Training and evaluation speed with NCHW and with channels_last (NHWC) batches, side by side.

``rl_mtd.data.channels_last_inputs`` decides the layout of every batch the library draws (training,
the proxy's BatchNorm re-estimate and repair steps, evaluation); ``RL_MTD_CHANNELS_LAST`` overrides
it, and this script sets it to 0 and 1 in turn. For the original net and its uniform Tucker-2 and
CP forms at ``--target`` it times, through the library's own functions: ``train`` for
``--steps`` steps (batch ``--batch-size``, augmentation, SGD), ``reestimate_bn`` over
``--bn-batches`` batches, and ``evaluate`` on ``--eval-images`` images, each after an untimed
warm-up call. The layouts alternate, ``--rounds`` times (which one goes first alternating too),
and each cell is the best round (the machine's noise only slows a round).
Speed does not depend on the weights, so the nets are freshly initialised.

    python benchmarks/layout_speed.py --net vgg11 --width 0.25 \\
        --data ../shared/data/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from _common import machine

from rl_mtd.baselines import uniform_policy
from rl_mtd.data import CHANNELS_LAST_ENV, load_cifar10, make_splits
from rl_mtd.errors import exit_on_user_error
from rl_mtd.evaluation import evaluate, reestimate_bn
from rl_mtd.metrics import count_params, cpu_seconds, others_cpu_share
from rl_mtd.models import NET_NAMES, build_vgg
from rl_mtd.policy import apply_policy
from rl_mtd.proxy import resolve_device
from rl_mtd.train import TrainConfig, train

LAYOUTS = {"NCHW": "0", "channels_last": "1"}


def time_net(net, splits, args) -> dict[str, float]:
    """Seconds per training step, per BN re-estimate and per evaluation, in the current layout,
    each after an untimed warm-up call (the first call of a new shape sets up its kernels)."""
    train(net, splits.train, config=TrainConfig(steps=2, lr=0.01))
    reestimate_bn(net, splits.train, batches=1)
    evaluate(net, splits.proxy)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=0.01)
    t0 = time.perf_counter()
    train(net, splits.train, config=cfg)
    t1 = time.perf_counter()
    reestimate_bn(net, splits.train, batches=args.bn_batches)
    t2 = time.perf_counter()
    evaluate(net, splits.proxy)
    t3 = time.perf_counter()
    return {"train": (t1 - t0) / args.steps, "bn": t2 - t1, "eval": t3 - t2}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", default="vgg11", choices=NET_NAMES)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--data", default="synthetic:2000,1000", help="dataset source")
    p.add_argument("--target", type=float, default=16.0, help="ratio of the uniform nets")
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--bn-batches", type=int, default=8)
    p.add_argument("--eval-images", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    splits = make_splits(load_cifar10(args.data), proxy_size=args.eval_images, seed=0).to(device)
    torch.manual_seed(0)
    base = build_vgg(args.net, width=args.width)
    nets = {"original": base}
    for method in ("tucker2", "cp"):
        policy = uniform_policy(base, method, args.target, net=args.net, width=args.width)
        net = apply_policy(base, policy)
        nets[f"uniform {method} {count_params(base) / count_params(net):.1f}x"] = net
    print(f"{args.net} width {args.width:g}, {machine()}, device {device}")
    print(
        f"train: {args.steps} steps at batch {args.batch_size}; BN re-estimate: "
        f"{args.bn_batches} batches; evaluate: {len(splits.proxy)} images; best of "
        f"{args.rounds} rounds, layouts alternating\n"
    )
    best: dict[tuple[str, str, str], float] = {}
    before, t0 = cpu_seconds(), time.perf_counter()
    saved = os.environ.get(CHANNELS_LAST_ENV)
    try:
        for r in range(args.rounds):
            for name, net in nets.items():
                order = list(LAYOUTS.items())  # which layout goes first alternates by round
                for layout, value in order if r % 2 == 0 else order[::-1]:
                    os.environ[CHANNELS_LAST_ENV] = value
                    cells = time_net(net.to(device), splits, args)
                    for what, sec in cells.items():
                        key = (name, layout, what)
                        best[key] = min(best.get(key, float("inf")), sec)
    finally:
        if saved is None:
            os.environ.pop(CHANNELS_LAST_ENV, None)
        else:
            os.environ[CHANNELS_LAST_ENV] = saved
    share = others_cpu_share(before, time.perf_counter() - t0)
    print("| model | what | NCHW | channels_last | speed-up |")
    print("|-|-|-:|-:|-:|")
    rows = {
        "train": ("train step", "ms/step", 1e3),
        "bn": ("BN re-estimate", "s", 1.0),
        "eval": ("evaluate", "s", 1.0),
    }
    for name in nets:
        for what, (label, unit, scale) in rows.items():
            a, b = (best[(name, layout, what)] for layout in LAYOUTS)
            print(
                f"| {name} | {label} | {_fmt(a * scale)} {unit} | {_fmt(b * scale)} {unit} | "
                f"{a / b:.2f}x |"
            )
    if share is not None:
        print(f"\nother processes used {share:.0%} of the CPUs meanwhile")


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


if __name__ == "__main__":
    exit_on_user_error(main)
