"""report.md: the run's report.json as a page a person reads (accuracies, budget, timings,
latency, the final check, the per-layer table)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agents.final_check import describe
from rl_mtd.io import write_text_atomic


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
        f"| compressed, proxy split{_proxy_label(r)} | {_pct(r['proxy_acc'])} |",
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


def _proxy_label(r: dict) -> str:
    """What the proxy did before scoring: " after BN re-estimate and 40 repair steps", or
    nothing beyond the split where it did neither (``--bn-batches 0 --repair-steps 0``)."""
    done = []
    if r.get("proxy_bn_batches", 1):  # reports without the field had the re-estimate
        done.append("BN re-estimate")
    if r.get("proxy_repair_steps"):
        done.append(f"{r['proxy_repair_steps']} repair steps")
    return f" after {' and '.join(done)}" if done else ", as decomposed"


def _ms(lat: dict[str, Any], name: str) -> str:
    p10, p90 = lat.get(f"{name}_p10_ms"), lat.get(f"{name}_p90_ms")
    spread = f" ({p10:.2f}-{p90:.2f})" if p10 is not None and p90 is not None else ""
    return f"{lat[f'{name}_ms']:.2f}{spread}"


def _export_line(r: dict[str, Any]) -> str:
    e = r.get("export")
    if not e:
        return ""
    line = f" Exported: {e['path']} ({e['format']})"
    if e.get("pad_channels", 1) > 1:
        line += f", factor chains padded to multiples of {e['pad_channels']} channels"
    if "max_abs_diff" in e:
        line += f", max abs difference from torch {e['max_abs_diff']:.2e}"
    if "onnxruntime_b1_ms" in e:
        line += (
            f", ONNX Runtime {e['onnxruntime_b1_ms']:.2f} ms at batch 1 and "
            f"{e['onnxruntime_b128_ms']:.2f} ms at batch 128"
        )
    return line + "."
