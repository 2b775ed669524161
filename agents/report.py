"""The run's report: report.json fields, report.md, and the PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
from torch import nn  # noqa: E402

from rl_mtd.decompose import conv_layers, layer_params  # noqa: E402
from rl_mtd.io import write_text_atomic  # noqa: E402
from rl_mtd.metrics import count_params, macs_by_layer  # noqa: E402
from rl_mtd.policy import Policy  # noqa: E402


def layer_rows(original: nn.Module, compressed: nn.Module, policy: Policy) -> list[dict[str, Any]]:
    """Per conv layer: method, rank, parameters and MACs before and after."""
    macs_before = macs_by_layer(original)
    macs_after = macs_by_layer(compressed)
    rows = []
    for (name, conv), choice in zip(conv_layers(original), policy.layers):
        block = compressed.get_submodule(name)
        after_macs = sum(v for k, v in macs_after.items() if k == name or k.startswith(name + "."))
        rows.append({
            "name": name,
            "method": choice.method,
            "rank": list(choice.rank) if isinstance(choice.rank, tuple) else choice.rank,
            "params_before": layer_params(conv),
            "params": count_params(block),
            "macs_before": macs_before[name],
            "macs": after_macs,
        })  # fmt: skip
    return rows


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    r = report
    lines = [
        f"# rl_mtd run: {r['net']} (width {r['width']}) on {r['dataset']}",
        "",
        f"Device {r['device']}, seed {r['seed']}, target ratio {r['target_ratio']}, "
        f"mode {r['mode']}.",
        "",
        "| | original | compressed | ratio |",
        "|-|-:|-:|-:|",
        f"| parameters (whole model) | {r['params_original']:,} | {r['params_compressed']:,} "
        f"| {r['compression_ratio']:.2f}x |",
        f"| parameters (conv layers only) | {r['conv_params_original']:,} | "
        f"{r['conv_params_compressed']:,} | {r['conv_compression_ratio']:.2f}x |",
        f"| MACs (conv + linear, one 32x32 image) | {r['macs_original']:,} | "
        f"{r['macs_compressed']:,} | {r['macs_original'] / r['macs_compressed']:.2f}x |",
    ]
    for key, label in (("latency_b1", "batch 1"), ("latency_b128", "batch 128")):
        lat = r.get(key)
        if lat:
            lines.append(
                f"| latency, {label}, {lat['device']} (median ms) | {lat['original_ms']:.2f} | "
                f"{lat['compressed_ms']:.2f} | {lat['speedup']:.2f}x |"
            )
    lines += [
        "",
        "| accuracy | top-1 |",
        "|-|-:|",
        f"| baseline, test split | {_pct(r['baseline_acc'])} |",
        f"| baseline, proxy split | {_pct(r.get('baseline_proxy_acc'))} |",
        f"| compressed, proxy split after BN re-estimate{_repair_label(r)} | {_pct(r['proxy_acc'])} |",
        f"| compressed, test split after fine-tuning | {_pct(r['finetuned_acc'])} |",
        f"| drop (baseline - fine-tuned, test) | {_pct(r['accuracy_drop'])} |",
        "",
        f"Search {r['search_seconds']:.0f} s ({r.get('episodes', 0)} episodes), "
        f"fine-tune {r['finetune_seconds']:.0f} s.",
        "",
        "Parameters count every trainable tensor (convs, BatchNorm, head); MACs count conv and "
        "linear layers. Accuracies are top-1 fractions shown as percentages.",
        "",
        "## Layers",
        "",
        "| layer | method | rank | params before | params after | ratio | MACs before | MACs after |",
        "|-|-|-|-:|-:|-:|-:|-:|",
    ]
    for row in r["layers"]:
        lines.append(
            f"| {row['name']} | {row['method']} | {row['rank'] if row['rank'] is not None else '-'} "
            f"| {row['params_before']:,} | {row['params']:,} | "
            f"{row['params_before'] / max(1, row['params']):.1f}x | {row['macs_before']:,} | "
            f"{row['macs']:,} |"
        )
    write_text_atomic(path, "\n".join(lines) + "\n")


def plot_rewards(path: Path, episodes: list[dict[str, Any]]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    if episodes:
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
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows)), 4))
    ratios = [r["params_before"] / max(1, r["params"]) for r in rows]
    ax.bar(range(len(rows)), ratios, color=[colors[r["method"]] for r in rows])
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("parameter reduction (x)")
    ax.set_title("per-layer method and ratio")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, list(colors), fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _repair_label(r: dict) -> str:
    steps = r.get("proxy_repair_steps")
    return f" and {steps} repair steps" if steps else ""
