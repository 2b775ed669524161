"""The run's report: a ``RunResult`` becomes report.json, report.md and the PNG plots.

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

from agents.final_check import describe
from agents.speed import LATENCY_BATCHES, latency
from rl_mtd.decompose import conv_layers, layer_params
from rl_mtd.io import atomic_path, write_json_atomic, write_text_atomic
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


def _latency_target(r: dict[str, Any]) -> str:
    pred = r.get("predicted_latency")
    if not pred:
        return ""
    return (
        f" Target speed-up {r['target_latency']:g}x at batch {pred['batch']} on this device: "
        f"{pred['speedup']:.2f}x predicted by the per-layer latency model "
        f"({pred['original_ms']:.3g} ms -> {pred['compressed_ms']:.3g} ms); measured below."
    )


def _budget_note(r: dict[str, Any]) -> str:
    if r.get("budget_met") is False:
        return (
            " **The policy does not meet this budget** (a replayed policy: edited, searched for "
            "another budget, or timed on another device)."
        )
    return ""


def _episodes_text(r: dict[str, Any]) -> str:
    done = r.get("episodes", 0)
    if not r.get("search_interrupted"):
        return f"{done} episodes"
    planned = r.get("episodes_planned")
    return (
        f"{done}{f' of {planned}' if planned else ''} episodes: **the search was interrupted** "
        "and its best policy so far applied; `run_agent.py --resume` with this directory "
        "searches on and replaces this report"
    )


def _final_check_lines(r: dict[str, Any]) -> list[str]:
    check = r.get("final_check")
    if not check:
        return []
    anchor, margin = check.get("anchor"), check.get("margin", 0)
    rule = "the one best on the held-out (proxy) split was fine-tuned in full"
    if anchor is not None and margin > 0:
        rule += (
            f", unless its lead over the search's start (candidate {anchor + 1}) was within "
            f"{margin:g} paired standard errors: then the start was, instead"
            if check.get("margin_applied", True)
            else f" (the {margin:g}-standard-error margin over the search's start could not be "
            "applied: a candidate has no image-by-image record)"
        )
    lines = [
        "",
        f"Final check ({check['seconds']:.0f} s, part of the search's): the search's best "
        f"{len(check['candidates'])} policies, each fine-tuned briefly; {rule}.",
        "",
        "| candidate | from | search score | held-out accuracy | "
        + ("lead over the start (paired s.e.) | " if anchor is not None else "")
        + "chosen |",
        "|-:|-|-:|-:|" + ("-:|" if anchor is not None else "") + "-|",
    ]
    for i, c in enumerate(check["candidates"]):
        score = c["search_score"]
        shown = "-" if score is None else f"{score:.4f}"
        lead = c.get("vs_anchor")
        gap = "-" if lead is None else f"{100 * lead['gap']:+.2f} ({100 * lead['se']:.2f}) points"
        lines.append(
            f"| {i + 1} | {describe(c['policy'].get('meta', {}))} | {shown} | "
            f"{_pct(c['held_out_acc'])} | "
            + (f"{gap} | " if anchor is not None else "")
            + f"{'yes' if i == check['chosen'] else ''} |"
        )
    return lines


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _points(x: float | None) -> str:
    """A difference of two accuracies, in percentage points."""
    return "-" if x is None else f"{100 * x:.2f} points"


def _images(r: dict[str, Any], split: str) -> str:
    n = r.get(f"{split}_images")
    return "" if n is None else f" ({n:,} images)"


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    r = report
    lines = [
        f"# rl_mtd run: {r['net']} (width {r['width']}) on {r['dataset']}",
        "",
        f"Device {r['device']}, seed {r['seed']}, target ratio {r['target_ratio']}, "
        f"target MACs reduction {r.get('target_macs')}, mode {r['mode']}."
        + _latency_target(r)
        + _budget_note(r),
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
    latency_keys = sorted(
        (k for k in r if k.startswith("latency_b") and k[9:].isdigit()), key=lambda k: int(k[9:])
    )
    for key in latency_keys:
        lat, label = r[key], f"batch {key[9:]}"
        head = f"latency, {label}, {lat['device']}, {lat.get('threads', '?')} threads"
        for kind, suffix in (("eager", ""), ("inference form", "_inference")):
            if f"original{suffix}_ms" not in lat:
                continue
            # Each row compares the two models run the same way; the inference form's row also
            # against the original as users run it today (report.json's inference_speedup).
            shown = f"{lat[f'original{suffix}_ms'] / lat[f'compressed{suffix}_ms']:.2f}x"
            if suffix:
                shown += f" ({lat['inference_speedup']:.2f}x against the eager original)"
            if lat.get("noisy"):
                shown = f"noisy (spread {100 * lat['spread']:.0f}%), not a measurement"
            lines.append(
                f"| {head}, {kind} (median ms, p10-p90) | {_ms(lat, 'original' + suffix)} | "
                f"{_ms(lat, 'compressed' + suffix)} | {shown} |"
            )
    lines += [
        "",
        "| accuracy | top-1 |",
        "|-|-:|",
        f"| baseline, test split{_images(r, 'test')} | {_pct(r['baseline_acc'])} |",
        f"| baseline, proxy split{_images(r, 'proxy')} | {_pct(r.get('baseline_proxy_acc'))} |",
        f"| compressed, proxy split after BN re-estimate{_repair_label(r)} | {_pct(r['proxy_acc'])} |",
        f"| compressed, test split after fine-tuning | {_pct(r['finetuned_acc'])} |",
        f"| drop (baseline - fine-tuned, test) | {_points(r['accuracy_drop'])} |",
        "",
        f"Search {r['search_seconds']:.0f} s ({_episodes_text(r)}), "
        f"fine-tune {r['finetune_seconds']:.0f} s.",
        *_final_check_lines(r),
        "",
        "Parameters count every trainable tensor (convs, BatchNorm, head); MACs count conv and "
        "linear layers. Accuracies are top-1 fractions shown as percentages. Latency ratios "
        "compare the two models run the same way: as trained (eager), or both in the inference "
        "form (BatchNorm folded, factor chains merged: rl_mtd.export.inference_model)."
        + _export_line(r),
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


def _repair_label(r: dict) -> str:
    steps = r.get("proxy_repair_steps")
    return f" and {steps} repair steps" if steps else ""


def _ms(lat: dict[str, Any], name: str) -> str:
    p10, p90 = lat.get(f"{name}_p10_ms"), lat.get(f"{name}_p90_ms")
    spread = f" ({p10:.2f}-{p90:.2f})" if p10 is not None and p90 is not None else ""
    return f"{lat[f'{name}_ms']:.2f}{spread}"


def _export_line(r: dict[str, Any]) -> str:
    e = r.get("export")
    if not e:
        return ""
    line = f" Exported: {e['path']} ({e['format']})"
    if "max_abs_diff" in e:
        line += f", max abs difference from torch {e['max_abs_diff']:.2e}"
    if "onnxruntime_b1_ms" in e:
        line += (
            f", ONNX Runtime {e['onnxruntime_b1_ms']:.2f} ms at batch 1 and "
            f"{e['onnxruntime_b128_ms']:.2f} ms at batch 128"
        )
    return line + "."
