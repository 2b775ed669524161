"""Does a per-layer latency model predict a compressed VGG's speed better than MACs? (issue 12)

A search that should find fast models needs a cost it can add up layer by layer, as it adds up
parameters and MACs. ``rl_mtd.latency.LatencyModel`` (what ``--target-latency`` budgets with)
times every conv layer of the net alone in its inference form (the conv, or the decomposed block
a policy puts there, with the layer's BatchNorm folded in and its ReLU, channels_last) on its
own input shape, and predicts a policy's latency as the sum of its layers plus a calibrated rest.
This script builds that model per batch size on this device, times whole compressed models
(uniform Tucker-2 and CP, and ``--random`` random mixed policies, at each of ``--targets``) with
the same timer, and prints how well the model predicts them beside two simpler predictors: the
layers' raw sum plus the original's rest (no calibration) and MACs (the best straight line
through (MACs, latency) over the very models it is scored on: an optimistic error). And per
layer, each option's speed-up over the kept layer beside its MAC reduction: which choices of
method and rank run fast on this device.

Weights are random and variance-preserving (latency does not depend on their values; see
``benchmarks/latency.py``). Timing: ``rl_mtd.latency.measured_timer`` (``--warmup`` passes, then
the median of ``--repeats``, best of ``--rounds``) with ``--threads`` threads.

    python benchmarks/layer_latency.py                      # VGG16 width 1, batches 1 and 64
    python benchmarks/layer_latency.py --device cuda --batches 1,256

Run it on an idle machine; the share of the CPUs other processes used is printed per batch.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from _common import spearman  # noqa: E402
from latency import _busy_note, _load, machine, variance_preserving  # noqa: E402

from rl_mtd.baselines import random_policies, uniform_policy  # noqa: E402
from rl_mtd.budget import DEFAULT_LEVELS  # noqa: E402
from rl_mtd.budget_table import BudgetTable  # noqa: E402
from rl_mtd.errors import exit_on_user_error  # noqa: E402
from rl_mtd.io import write_json_atomic  # noqa: E402
from rl_mtd.latency import LatencyModel, measured_timer  # noqa: E402
from rl_mtd.metrics import count_macs, cpu_seconds, others_cpu_share  # noqa: E402
from rl_mtd.models import build_vgg  # noqa: E402
from rl_mtd.policy import Policy, apply_policy  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--net", default="vgg16")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    p.add_argument(
        "--levels",
        default=",".join(f"{v:g}" for v in DEFAULT_LEVELS),
        help="per-layer parameter reductions of the options",
    )
    p.add_argument("--targets", default="4,8,16,37", help="budgets of the whole-model policies")
    p.add_argument("--random", type=int, default=4, help="random mixed policies per target")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write every measurement here")
    return p.parse_args(argv)


def policies(original: nn.Module, args: argparse.Namespace) -> list[tuple[str, Policy]]:
    out = []
    kw = dict(net=args.net, width=args.width)
    for t in (float(v) for v in args.targets.split(",")):
        out.append((f"tucker2 {t:g}x", uniform_policy(original, "tucker2", t, **kw)))
        out.append((f"cp {t:g}x", uniform_policy(original, "cp", t, **kw)))
        mixed = random_policies(original, t, args.random, seed=args.seed, settled=False, **kw)
        out += [(f"random {t:g}x #{k}", p) for k, p in enumerate(mixed)]
    return out


def fit_line(x: list[float], y: list[float]) -> list[float]:
    """Least-squares ``a*x + b`` through the points, evaluated at ``x``."""
    a, b = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return [a * v + b for v in x]


def errors(pred: list[float], meas: list[float]) -> tuple[float, float]:
    rel = [abs(p - m) / m for p, m in zip(pred, meas, strict=True)]
    return statistics.median(rel), max(rel)


def layer_table(lm: LatencyModel, table: BudgetTable, show: list[int]) -> str:
    """Per layer: the kept layer's ms, then per method and shown level, speed-up (MAC cut)."""
    head = ["layer", "input", "keep ms"]
    for m in ("tucker2", "cp"):
        head += [f"{m} {table.levels[li]:g}x" for li in show]
    lines = ["| " + " | ".join(head) + " |", "|" + "-|" * len(head)]
    for (name, conv), layer in zip(lm.convs, table.layers, strict=True):
        keep = lm.layer_ms(name, "keep", None)
        c, h, w = lm.shapes[name]
        row = [name, f"{c}x{h}x{w} -> {conv.out_channels}", f"{keep:.3f}"]
        for m in ("tucker2", "cp"):
            mi = table.methods.index(m)
            for li in show:
                ms = lm.layer_ms(name, m, layer.rank((mi, li)))
                macs_x = layer.original_macs / layer.macs((mi, li))
                row.append(f"{keep / ms:.1f}x ({macs_x:.0f}x)")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    levels = [float(v) for v in args.levels.split(",")]
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]])
    print(f"    {command}\n")
    print(f"machine: {machine(args.threads)}; load average at start {_load()}\n")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    original = variance_preserving(build_vgg(args.net, width=args.width)).eval()
    table = BudgetTable(original, ("keep", "tucker2", "cp"), levels)
    named = policies(original, args)
    macs0 = count_macs(original)
    whole = [
        (n, p, variance_preserving(apply_policy(original, p, factorize=False)).eval())
        for n, p in named
    ]
    timer = measured_timer(
        args.device,
        threads=args.threads,
        warmup=args.warmup,
        repeats=args.repeats,
        rounds=args.rounds,
    )
    record: dict[str, object] = {"args": vars(args), "machine": machine(args.threads)}
    show = [li for li, lv in enumerate(table.levels) if lv in (4.0, 16.0, 64.0)] or [0]
    for bs in batches:
        before, t0 = cpu_seconds(), time.perf_counter()
        lm = LatencyModel(original, batch_size=bs, timer=timer, device=args.device)
        meas = [timer(m, (bs, 3, 32, 32)) for _, _, m in whole]
        kept = sum(lm.layer_ms(n, "keep", None) for n, _ in lm.convs)
        raw_rest = lm.original_ms - kept
        scale = (lm.original_ms - lm.rest_ms) / kept  # the model's calibration before 2026-11-28
        model_pred, naive, scaled = [], [], []
        for _, p, _ in whole:
            choices = p.choices()
            model_pred.append(lm.predict(choices))
            alone = [lm.layer_ms(n, m, r) for (n, _), (m, r) in zip(lm.convs, choices, strict=True)]
            naive.append(raw_rest + sum(alone))
            scaled.append(
                lm.rest_ms
                + sum(a * (scale if m == "keep" else 1) for a, (m, _) in zip(alone, choices))
            )
        per_layer = layer_table(lm, table, show)
        busy = others_cpu_share(before, time.perf_counter() - t0)
        macs = [count_macs(m) for _, _, m in whole]
        print(
            f"batch {bs}, {args.threads} threads, {args.device}{_busy_note(busy)}; "
            f"{lm.describe()}\n"
        )
        print("| model | MACs x | measured ms | predicted ms | speed-up | predicted speed-up |")
        print("|-|-:|-:|-:|-:|-:|")
        print(f"| original | 1.0 | {lm.original_ms:.3f} | {lm.original_ms:.3f} | 1.0x | 1.0x |")
        for (name, _, _), m, a, b in zip(whole, macs, meas, model_pred, strict=True):
            print(
                f"| {name} | {macs0 / m:.1f} | {a:.3f} | {b:.3f} | {lm.original_ms / a:.1f}x | "
                f"{lm.original_ms / b:.1f}x |"
            )
        print()
        print("| predictor | Spearman | median rel. error | worst rel. error |")
        print("|-|-:|-:|-:|")
        predictors = (
            ("latency model (rl_mtd.latency: rest, weights beyond cache)", model_pred),
            ("kept layers scaled instead (the model before the cache term)", scaled),
            ("layers alone summed, plus the original's rest", naive),
            ("MACs, best line through the measured models", fit_line(macs, meas)),
        )
        for label, p in predictors:
            med, worst = errors(p, meas)
            print(f"| {label} | {spearman(p, meas):.3f} | {med:.1%} | {worst:.1%} |")
        print(
            f"\nPer layer at batch {bs}: the kept layer's ms, then each option's speed-up over it "
            "(its MAC reduction):\n"
        )
        print(per_layer + "\n")
        record[f"batch {bs}"] = {
            "others_share": busy,
            "original_ms": lm.original_ms,
            "rest_ms": lm.rest_ms,
            "keep_scale": lm.keep_scale,
            "per_byte_ms": lm.per_byte_ms,
            "cache_bytes": lm.cache,
            "models": [
                {
                    "name": n,
                    "macs": m,
                    "measured_ms": a,
                    "predicted_ms": b,
                    "naive_ms": c,
                    "scaled_ms": d,
                }
                for (n, _, _), m, a, b, c, d in zip(
                    whole, macs, meas, model_pred, naive, scaled, strict=True
                )
            ],
            "layer_ms": lm.measurements(),
        }
    print(f"load average at the end {_load()}")
    if args.json:
        write_json_atomic(Path(args.json), record)


if __name__ == "__main__":
    exit_on_user_error(main)
