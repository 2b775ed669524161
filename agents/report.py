"""The run's report: a ``RunResult`` becomes report.json, report.md (written by
``agents.report_md``) and the PNG plots.

Plots use matplotlib's object API (``Figure``), so no global backend is chosen and nothing needs
a display.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import nn

from agents.report_md import write_markdown
from agents.speed import LATENCY_BATCHES, latency
from rl_mtd.decompose import conv_layers, layer_params
from rl_mtd.io import atomic_path, write_json_atomic
from rl_mtd.metrics import count_macs, count_params, macs_by_layer
from rl_mtd.policy import Policy
from rl_mtd.proxy import ProxyConfig
from rl_mtd.train import TrainResult


@dataclass
class RunResult:
    """Everything one run produced; ``build_report`` turns it into report.json's content."""

    config: dict[str, Any]
    """The resolved ``RunConfig`` as a dict."""
    device: torch.device
    dataset: str
    baseline: nn.Module
    compressed: nn.Module
    policy: Policy
    baseline_acc: float
    baseline_proxy_acc: float
    proxy_config: ProxyConfig
    proxy_acc: float
    finetuned_acc: float
    finetune: TrainResult
    search_seconds: float
    proxy_evaluations: int
    """Policies the proxy really scored (memoised repeats not counted), over every invocation
    of a resumed search."""
    episodes: list[dict[str, Any]] = field(default_factory=list)
    invocations: list[dict[str, Any]] = field(default_factory=list)
    budget_met: bool | None = None
    """Whether the policy meets the run's budget (None without one, in trade-off mode)."""
    predicted_latency: dict[str, Any] | None = None
    """With ``--target-latency``: the latency model's prediction for the policy (batch,
    original_ms measured, compressed_ms predicted, speedup)."""
    final_check: dict[str, Any] | None = None
    """With ``--final-check``: ``CheckResult.to_dict()`` (the candidates, their held-out
    accuracy after the short fine-tune, the one chosen)."""
    split_sizes: dict[str, int] = field(default_factory=dict)
    """Images in the ``train``, ``proxy`` and ``test`` splits the accuracies were measured on."""
    search_interrupted: bool = False
    """The search was stopped with Ctrl-C and its best policy so far applied (``--resume``
    searches on and replaces this report)."""


def build_report(r: RunResult, latency_repeats: int = 20) -> dict[str, Any]:
    """report.json's content (DESIGN.md lists the fields users rely on)."""
    cfg = r.config
    rows = layer_rows(r.baseline, r.compressed, r.policy)
    conv_before = sum(layer_params(c) for _, c in conv_layers(r.baseline))
    conv_after = sum(row["params"] for row in rows)
    params_o, params_c = count_params(r.baseline), count_params(r.compressed)
    report: dict[str, Any] = {
        "net": cfg["net"],
        "width": cfg["width"],
        "dataset": r.dataset,
        "device": str(r.device),
        "seed": cfg["seed"],
        "target_ratio": cfg["target_ratio"],
        "target_macs": cfg.get("target_macs"),
        "target_latency": cfg.get("target_latency"),
        "mode": "budget"
        if any(cfg.get(k) for k in ("target_ratio", "target_macs", "target_latency"))
        else "trade-off",
        "budget_met": r.budget_met,
        "replay": cfg["replay"],
        "baseline_acc": r.baseline_acc,
        "baseline_proxy_acc": r.baseline_proxy_acc,
        "proxy_bn_batches": r.proxy_config.bn_batches,
        "proxy_repair_steps": r.proxy_config.repair_steps,
        "fit": r.proxy_config.fit,
        "observe": cfg.get("observe", "layer"),
        "finetune_recipe": {
            k: cfg.get(k)
            for k in (
                "finetune_epochs",
                "finetune_lr",
                "finetune_weight_decay",
                "finetune_label_smoothing",
                "kd",
                "feature_kd",
                "stages",
                "batch_size",
            )
        },
        "proxy_acc": r.proxy_acc,
        "finetuned_acc": r.finetuned_acc,
        "accuracy_drop": r.baseline_acc - r.finetuned_acc,
        "accuracy_units": "fractions (0..1): baseline_acc, finetuned_acc and accuracy_drop on "
        "the test split (test_images), baseline_proxy_acc and proxy_acc on the proxy split "
        "(proxy_images), which the search and the fine-tune's checkpoint choice also used",
        **{f"{k}_images": n for k, n in r.split_sizes.items()},
        "params_original": params_o,
        "params_compressed": params_c,
        "compression_ratio": params_o / params_c,
        "conv_params_original": conv_before,
        "conv_params_compressed": conv_after,
        "conv_compression_ratio": conv_before / max(1, conv_after),
        "macs_original": count_macs(r.baseline),
        "macs_compressed": count_macs(r.compressed),
        "macs_ratio": count_macs(r.baseline) / count_macs(r.compressed),
        "search_seconds": r.search_seconds,
        "finetune_seconds": r.finetune.seconds,
        "finetune_recoveries": r.finetune.recoveries,
        "episodes": len(r.episodes),
        "episodes_planned": None
        if cfg.get("replay") or cfg.get("timesteps")
        else cfg.get("episodes"),
        "search_interrupted": r.search_interrupted,
        "proxy_evaluations": r.proxy_evaluations,
        "invocations": r.invocations,
        "final_check": r.final_check,
        "layers": [
            {
                k: row[k]
                for k in (
                    "name",
                    "method",
                    "rank",
                    "params",
                    "macs",
                    "params_before",
                    "macs_before",
                )
            }
            for row in rows
        ],
    }
    batches = LATENCY_BATCHES
    if r.predicted_latency is not None:
        report["latency_batch"] = r.predicted_latency["batch"]
        report["predicted_latency"] = r.predicted_latency
        batches = tuple(sorted({*batches, int(r.predicted_latency["batch"])}))
    report.update(latency(r.baseline, r.compressed, r.device, latency_repeats, batches))
    return report


def write_outputs(run_dir: Path, report: dict[str, Any], episodes: list[dict[str, Any]]) -> None:
    """report.json, report.md, layers.png, and reward_curve.png when a search ran."""
    write_json_atomic(run_dir / "report.json", report)
    write_markdown(run_dir / "report.md", report)
    if episodes:
        plot_rewards(run_dir / "reward_curve.png", episodes)
    plot_layers(run_dir / "layers.png", report["layers"])


def layer_rows(original: nn.Module, compressed: nn.Module, policy: Policy) -> list[dict[str, Any]]:
    """Per conv layer: method, rank, parameters and MACs before and after."""
    macs_before = macs_by_layer(original)
    macs_after = macs_by_layer(compressed)
    rows = []
    for (name, conv), choice in zip(conv_layers(original), policy.layers):
        block = compressed.get_submodule(name)
        after_macs = sum(v for k, v in macs_after.items() if k == name or k.startswith(name + "."))
        rows.append(
            {
                "name": name,
                "method": choice.method,
                "rank": list(choice.rank) if isinstance(choice.rank, tuple) else choice.rank,
                "params_before": layer_params(conv),
                "params": count_params(block),
                "macs_before": macs_before[name],
                "macs": after_macs,
            }
        )
    return rows


def plot_rewards(path: Path, episodes: list[dict[str, Any]]) -> None:
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    xs = [e["episode"] for e in episodes]
    ys = [e["reward"] for e in episodes]
    best, run = [], float("-inf")
    for y in ys:
        run = max(run, y)
        best.append(run)
    ax.plot(xs, ys, ".", alpha=0.5, label="episode reward")
    ax.plot(xs, best, "-", label="best so far")
    ax.legend()
    ax.set_xlabel("episode")
    ax.set_ylabel("reward")
    ax.set_title("search reward")
    fig.tight_layout()
    _save(fig, path)


def plot_layers(path: Path, rows: list[dict[str, Any]]) -> None:
    colors = {"keep": "tab:gray", "tucker2": "tab:blue", "cp": "tab:orange"}
    fig = Figure(figsize=(max(6, 0.5 * len(rows)), 4))
    ax = fig.subplots()
    ratios = [r["params_before"] / max(1, r["params"]) for r in rows]
    ax.bar(range(len(rows)), ratios, color=[colors[r["method"]] for r in rows])
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("parameter reduction (x)")
    ax.set_title("per-layer method and ratio")
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, list(colors), fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
