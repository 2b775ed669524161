"""Does a per-layer latency table predict a compressed VGG's speed better than its MACs? (issue 12)

A search that should find fast models needs a cost it can add up layer by layer, as it adds up
parameters and MACs. This script measures, on this device, every conv layer of the net alone in
its inference form (the conv, or the decomposed block the policy puts there, with the layer's
BatchNorm folded in and its ReLU, channels_last; ``rl_mtd.export.inference_model``) on its own
input shape, at each option the search offers (keep; Tucker-2 and CP at ``--levels``), at each
batch size. A policy's predicted latency is the sum of its layers' times plus the rest of the net
(the original's whole time less its layers' own: pooling, the head, Python).

It then times whole compressed models (uniform Tucker-2 and CP, and ``--random`` random mixed
policies, at each of ``--targets``) in the inference form, and prints per batch size how well
the summed table predicts them beside how well MACs do: Spearman correlation and the median and
worst relative error of the sum as it is, and of the best straight line through (sum, latency)
and through (MACs, latency) over the compressed models (a calibration fitted to the very models
it is scored on: an optimistic error, the same for both). And per layer,
what each option's speed-up over the kept layer is beside its MAC reduction: which choices of
method and rank run fast on this device.

Weights are random and variance-preserving (latency does not depend on their values; see
``benchmarks/latency.py``). Timing: ``rl_mtd.metrics.measure_latency`` (``--warmup`` passes,
then the median of ``--repeats``) with ``--threads`` threads, best of ``--rounds``.

    python benchmarks/layer_latency.py                      # VGG16 width 1, batches 1 and 64
    python benchmarks/layer_latency.py --device cuda --batches 1,256

Run it on an idle machine; the share of the CPUs other processes used is printed per batch.
"""

from __future__ import annotations

import argparse
import copy
import json
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
from latency import (  # noqa: E402
    _busy_note,
    _cpu_seconds,
    _load,
    machine,
    others_share,
    variance_preserving,  # noqa: E402
)

from rl_mtd.baselines import random_policies, uniform_policy  # noqa: E402
from rl_mtd.budget import DEFAULT_LEVELS, BudgetTable, conv_input_sizes  # noqa: E402
from rl_mtd.decompose import build_decomposed, conv_layers  # noqa: E402
from rl_mtd.export import inference_model  # noqa: E402
from rl_mtd.io import write_json_atomic  # noqa: E402
from rl_mtd.metrics import count_macs, measure_latency  # noqa: E402
from rl_mtd.models import build_vgg  # noqa: E402
from rl_mtd.policy import Policy, apply_policy  # noqa: E402

Option = tuple[str, object]  # (method, rank); rank None for keep


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


def layer_block(model: nn.Module, name: str, conv: nn.Module) -> nn.Module:
    """``conv`` (the layer ``name`` of ``model``, or what replaces it) with the BatchNorm and
    ReLU that follow it in its Sequential, as the inference form runs them."""
    parent_name, _, idx = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    tail: list[nn.Module] = []
    for m in list(parent)[int(idx) + 1 :]:
        if isinstance(m, nn.BatchNorm2d | nn.ReLU):
            tail.append(copy.deepcopy(m))
        else:
            break
    return nn.Sequential(conv, *tail).eval()


class LayerTimer:
    """Times each (layer, option) once per batch size, on demand, and remembers it."""

    def __init__(self, model: nn.Module, args: argparse.Namespace):
        self.model, self.args = model, args
        self.convs = conv_layers(model)
        self.sizes = conv_input_sizes(model)
        self.ms: dict[tuple[int, str, str, int], float] = {}

    def __call__(self, i: int, option: Option, bs: int) -> float:
        method, rank = option
        key = (i, method, json.dumps(rank), bs)
        if key not in self.ms:
            name, conv = self.convs[i]
            body = conv if method == "keep" else build_decomposed(conv, method, rank)
            block = variance_preserving(layer_block(self.model, name, copy.deepcopy(body)))
            net = inference_model(block.to(self.args.device))
            h, _ = self.sizes[name]
            self.ms[key] = best_median(
                net, self.args, bs, in_channels=conv.in_channels, input_size=h, channels_last=True
            )
        return self.ms[key]


def best_median(net: nn.Module, args: argparse.Namespace, bs: int, **shape) -> float:
    kw = dict(batch_size=bs, device=args.device, threads=args.threads, warmup=args.warmup)
    with torch.inference_mode():
        return min(
            measure_latency(net, repeats=args.repeats, **kw, **shape)["median_ms"]
            for _ in range(args.rounds)
        )


def choices_of(policy: Policy) -> list[Option]:
    return [(c.method, None if c.method == "keep" else c.rank) for c in policy.layers]


def policies(original: nn.Module, args: argparse.Namespace) -> list[tuple[str, Policy]]:
    out = []
    kw = dict(net=args.net, width=args.width)
    for t in (float(v) for v in args.targets.split(",")):
        out.append((f"tucker2 {t:g}x", uniform_policy(original, "tucker2", t, **kw)))
        out.append((f"cp {t:g}x", uniform_policy(original, "cp", t, **kw)))
        mixed = random_policies(original, t, args.random, seed=args.seed, **kw)
        out += [(f"random {t:g}x #{k}", p) for k, p in enumerate(mixed)]
    return out


def fit_line(x: list[float], y: list[float]) -> list[float]:
    """Least-squares ``a*x + b`` through the points, evaluated at ``x``."""
    a, b = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return [a * v + b for v in x]


def errors(pred: list[float], meas: list[float]) -> tuple[float, float]:
    rel = [abs(p - m) / m for p, m in zip(pred, meas, strict=True)]
    return statistics.median(rel), max(rel)


def layer_table(timer: LayerTimer, table: BudgetTable, bs: int, show: list[int]) -> str:
    """Per layer: the kept layer's ms, then per method and shown level, speed-up (MAC cut)."""
    head = ["layer", "input", "keep ms"]
    for m in ("tucker2", "cp"):
        head += [f"{m} {table.levels[li]:g}x" for li in show]
    lines = ["| " + " | ".join(head) + " |", "|" + "-|" * len(head)]
    for i, layer in enumerate(table.layers):
        name, conv = timer.convs[i]
        keep = timer(i, ("keep", None), bs)
        h, w = timer.sizes[name]
        row = [name, f"{conv.in_channels}x{h}x{w} -> {conv.out_channels}", f"{keep:.3f}"]
        for m in ("tucker2", "cp"):
            mi = table.methods.index(m)
            for li in show:
                ms = timer(i, (m, layer.rank((mi, li))), bs)
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
    timer = LayerTimer(original, args)
    named = policies(original, args)
    macs0 = count_macs(original)
    whole = [("original", None, original)] + [
        (n, p, variance_preserving(apply_policy(original, p, factorize=False)).eval())
        for n, p in named
    ]
    forms = [(n, p, count_macs(m), inference_model(m.to(args.device))) for n, p, m in whole]
    record: dict[str, object] = {"args": vars(args), "machine": machine(args.threads)}
    show = [li for li, lv in enumerate(table.levels) if lv in (4.0, 16.0, 64.0)] or [0]
    for bs in batches:
        before, t0 = _cpu_seconds(), time.perf_counter()
        meas = [best_median(f, args, bs) for _, _, _, f in forms]
        keep_sum = sum(timer(i, ("keep", None), bs) for i in range(len(timer.convs)))
        rest = meas[0] - keep_sum
        pred = [meas[0]] + [
            rest + sum(timer(i, o, bs) for i, o in enumerate(choices_of(p)))
            for _, p, _, _ in forms[1:]
        ]
        per_layer = layer_table(timer, table, bs, show)
        busy = others_share(before, time.perf_counter() - t0)
        macs = [m for _, _, m, _ in forms]
        print(
            f"batch {bs}, {args.threads} threads, {args.device}{_busy_note(busy)}; the original "
            f"{meas[0]:.2f} ms, its layers alone {keep_sum:.2f} ms, the rest {rest:.2f} ms\n"
        )
        print("| model | MACs x | measured ms | table's sum ms | speed-up | table's speed-up |")
        print("|-|-:|-:|-:|-:|-:|")
        for (name, _, m, _), a, b in zip(forms, meas, pred, strict=True):
            print(
                f"| {name} | {macs0 / m:.1f} | {a:.3f} | {b:.3f} | {meas[0] / a:.1f}x | "
                f"{pred[0] / b:.1f}x |"
            )
        print()
        print("| predictor | Spearman | median rel. error | worst rel. error |")
        print("|-|-:|-:|-:|")
        predictors = (
            ("per-layer table, summed, plus the original's rest", pred[1:]),
            ("per-layer table, best line through its sums", fit_line(pred[1:], meas[1:])),
            ("MACs, best line", fit_line(macs[1:], meas[1:])),
        )
        for label, p in predictors:
            med, worst = errors(p, meas[1:])
            print(f"| {label} | {spearman(p, meas[1:]):.3f} | {med:.1%} | {worst:.1%} |")
        print(
            f"\nPer layer at batch {bs}: the kept layer's ms, then each option's speed-up over it "
            "(its MAC reduction):\n"
        )
        print(per_layer + "\n")
        record[f"batch {bs}"] = {
            "others_share": busy,
            "models": [
                {"name": n, "macs": m, "measured_ms": a, "predicted_ms": b}
                for (n, _, m, _), a, b in zip(forms, meas, pred, strict=True)
            ],
        }
    record["layer_ms"] = [
        {"layer": i, "method": m, "rank": json.loads(r), "batch": bs, "ms": ms}
        for (i, m, r, bs), ms in timer.ms.items()
    ]
    print(f"load average at the end {_load()}")
    if args.json:
        write_json_atomic(Path(args.json), record)


if __name__ == "__main__":
    main()
