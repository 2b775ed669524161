"""Shared setup of the benchmark scripts: data, a cached baseline, and small statistics."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from agents.config import RunConfig
from agents.inputs import get_baseline, load_data
from agents.presets import REPAIR_STEPS
from rl_mtd.budget import DEFAULT_LEVELS
from rl_mtd.budget_table import BudgetTable
from rl_mtd.data import DataSplits
from rl_mtd.decompose import METHODS, conv_layers, default_cache, get_factors
from rl_mtd.errors import RlMtdError
from rl_mtd.models import NET_NAMES
from rl_mtd.proxy import Proxy, ProxyConfig, default_repair, resolve_device


def add_common_args(p: argparse.ArgumentParser, *, net: str = "vgg11", width: float = 0.25) -> None:
    p.add_argument("--net", default=net, choices=NET_NAMES)
    p.add_argument("--width", type=float, default=width)
    p.add_argument("--data", default=None, help="dataset source (default $RL_MTD_DATA)")
    p.add_argument(
        "--checkpoint", default=None, help="baseline checkpoint (default: train, cached)"
    )
    p.add_argument("--baseline-epochs", type=float, default=10)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--proxy-size", type=int, default=2000)
    p.add_argument("--test-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the baseline")
    p.add_argument("--no-progress", action="store_true")


def add_proxy_args(p: argparse.ArgumentParser, *, repair_steps: int = REPAIR_STEPS) -> None:
    """The proxy's settings (rl_mtd.proxy.ProxyConfig), with run_agent.py's cpu-preset defaults."""
    d = default_repair()
    p.add_argument("--bn-batches", type=int, default=8, help="batches for the BN re-estimate")
    p.add_argument(
        "--repair-steps",
        type=int,
        default=repair_steps,
        help="SGD steps on each policy before scoring (0: BN re-estimate only)",
    )
    p.add_argument("--repair-lr", type=float, default=d.lr)
    p.add_argument("--repair-kd", type=float, default=d.kd_alpha)
    p.add_argument(
        "--fit",
        default="weights",
        choices=["weights", "data"],
        help="factorise to the kernel alone or to the layer's outputs on baseline activations",
    )
    p.add_argument(
        "--fit-shrink",
        type=float,
        default=0.0,
        help="--fit data: shrink each input moment this far towards the weight-only fit (0..1)",
    )


def make_proxy(args: argparse.Namespace, baseline, splits: DataSplits, device) -> Proxy:
    """A proxy over ``baseline`` with the script's proxy settings (``proxy_config(args)``)."""
    return Proxy(
        baseline,
        train_split=splits.train,
        proxy_split=splits.proxy,
        device=device,
        config=proxy_config(args),
        net=args.net,
        width=args.width,
    )


def proxy_config(args: argparse.Namespace, **overrides) -> ProxyConfig:
    repair = replace(
        default_repair(),
        lr=args.repair_lr,
        kd_alpha=args.repair_kd,
        batch_size=getattr(args, "batch_size", 128),
    )
    values = {
        "bn_batches": args.bn_batches,
        "repair_steps": args.repair_steps,
        "repair": repair,
        "fit": args.fit,
        "fit_shrink": getattr(args, "fit_shrink", 0.0),
        "seed": getattr(args, "seed", 0),
        **overrides,
    }
    return ProxyConfig(**values)


def setup(args: argparse.Namespace) -> tuple[RunConfig, DataSplits, torch.nn.Module, torch.device]:
    """Data splits and the baseline (trained once and cached, exactly as run_agent.py does)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = RunConfig(
        net=args.net,
        width=args.width,
        data=args.data,
        checkpoint=args.checkpoint,
        baseline_epochs=args.baseline_epochs,
        train_size=args.train_size,
        proxy_size=args.proxy_size,
        test_size=args.test_size,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress,
        batch_size=args.batch_size,
        lr=args.lr,
    )
    device = resolve_device(cfg.device)
    splits, data = load_data(cfg)
    splits = splits.to(device)
    baseline, _ = get_baseline(cfg, splits, data.key, device)
    return cfg, splits, baseline.eval(), device


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
        f"threads, {gpu}, torch {torch.__version__}"
    )


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(x: list[float]) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):  # average the ranks of ties
            idx = x == v
            r[idx] = r[idx].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def prefill_factors(
    model: torch.nn.Module, levels: Sequence[float] = DEFAULT_LEVELS
) -> tuple[float, int]:
    """Factorise every (layer, method, level) option once; returns seconds and the count.

    ``levels`` default to the agent's (``rl_mtd.budget.DEFAULT_LEVELS``, also the random
    strategy's).
    """
    t0 = time.perf_counter()
    table = BudgetTable(model, METHODS, levels)
    n = 0
    for (_, conv), layer in zip(conv_layers(model), table.layers):
        for (mi, _), (rank, _, _) in layer.options.items():
            if METHODS[mi] != "keep":
                get_factors(conv, METHODS[mi], rank, cache=default_cache())
                n += 1
    return time.perf_counter() - t0, n


def finetuned_tests(
    policy_files: list[Path], sweep_rows: list[Path] = (), recipe: str | None = None
) -> dict[Path, float]:
    """The fine-tuned test accuracy of each policy file: what compare.py recorded beside each
    ``<strategy>-<t>x-seed<s>`` (its ``rows.json``), or, for a file named in finetune_sweep.py's
    ``rows.json`` files ``sweep_rows`` (by its stem; only ``recipe``'s rows when given), the mean
    over the seeds it was fine-tuned with there."""
    found = {}
    swept: dict[str, list[float]] = {}
    recipes = set()
    for rows_file in sweep_rows:
        for r in json.loads(Path(rows_file).read_text()):
            if recipe is None or r["recipe"] == recipe:
                swept.setdefault(r["policy"], []).append(r["test_acc"])
                recipes.add(r["recipe"])
    if len(recipes) > 1:
        raise RlMtdError(
            f"the fine-tune rows hold several recipes ({', '.join(sorted(recipes))}); "
            "choose one with --recipe"
        )
    stems = [f.stem for f in policy_files]
    clash = sorted({s for s in stems if stems.count(s) > 1 and s in swept})
    if clash:
        raise RlMtdError(
            f"policy files in several folders share the name {clash[0]}.json, and the fine-tune "
            "rows name policies by file name only; rescore them in separate runs"
        )
    for f in policy_files:
        if f.stem in swept:  # finetune_sweep.py names a --policy file's rows by its stem
            found[f] = statistics.fmean(swept[f.stem])
            continue
        rows = f.parent / "rows.json"
        if not rows.exists():
            continue
        for r in json.loads(rows.read_text()):
            stem = f"{r['strategy']}-{r['target']:g}x-seed{r['seed']}"
            if f.name == f"{stem}.policy.json":
                found[f] = r["test_acc"]
    return found
