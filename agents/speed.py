"""The report's speed figures: forward time of the original and the compressed model, eager and
in inference form (``latency``), and the exported file, checked against torch and timed under
ONNX Runtime where installed (``write_export``)."""

from __future__ import annotations

import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rl_mtd.metrics import measure_latency

LATENCY_BATCHES = (1, 128)
NOISY_SPREAD = 0.5
"""A latency spread (p90 - p10) above this fraction of the median marks the timing as noisy."""


def latency(
    baseline: nn.Module,
    compressed: nn.Module,
    device: torch.device,
    repeats: int,
    batches: tuple[int, ...] = LATENCY_BATCHES,
) -> dict[str, Any]:
    """Median and spread of the forward time at each of ``batches``: both models as
    trained (eager, eval mode) and in their inference form (``rl_mtd.export.inference_model``:
    BatchNorm folded, factor chains merged).

    The models alternate, measurement by measurement, so a neighbour that loads the machine for a
    while slows all alike; ``noisy`` flags a spread (p90 - p10) above ``NOISY_SPREAD`` of the
    median, where the speed-ups are not to be trusted.
    """
    from rl_mtd.export import inference_model

    models = {
        "original": baseline.eval(),
        "compressed": compressed.eval(),
        "original_inference": inference_model(baseline),
        "compressed_inference": inference_model(compressed),
    }
    out = {}
    threads = torch.get_num_threads()
    for bs in batches:
        # Each measurement is the median of a block of passes: single passes at batch 1 caught
        # 4-8 ms scheduler stalls on a 2-core machine (benchmarks/latency.py).
        block = max(1, 16 // bs)
        kw = {"batch_size": bs, "device": device, "repeats": block, "warmup": 0, "threads": threads}
        for model in models.values():  # warm-up
            measure_latency(model, **{**kw, "repeats": max(2, repeats // 4)})
        runs: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(repeats):
            for name, model in models.items():
                runs[name].append(measure_latency(model, **kw)["median_ms"])
        entry: dict[str, Any] = {"device": str(device), "threads": threads, "repeats": repeats}
        spreads = []
        for name, times in runs.items():
            times.sort()
            median = statistics.median(times)
            p10, p90 = times[len(times) // 10], times[(len(times) * 9) // 10]
            entry.update({f"{name}_ms": median, f"{name}_p10_ms": p10, f"{name}_p90_ms": p90})
            spreads.append((p90 - p10) / median if median > 0 else math.inf)
        entry["speedup"] = entry["original_ms"] / entry["compressed_ms"]
        # Against the original as users run it (eager), and both in the inference form.
        entry["inference_speedup"] = entry["original_ms"] / entry["compressed_inference_ms"]
        entry["inference_form_speedup"] = (
            entry["original_inference_ms"] / entry["compressed_inference_ms"]
        )
        entry["spread"] = max(spreads)
        entry["noisy"] = entry["spread"] > NOISY_SPREAD
        out[f"latency_b{bs}"] = entry
    return out


def write_export(kind: str, model: nn.Module, run_dir: Path) -> dict[str, Any]:
    """Write the inference form as ``kind`` ("onnx" or "torchscript"); with onnxruntime
    installed, check an ONNX file's outputs against torch and time it. Returns report fields."""
    from rl_mtd.conv_pad import nchwc_block
    from rl_mtd.export import INPUT, inference_model, to_onnx, to_torchscript

    x = torch.randn(8, 3, 32, 32)
    reference = inference_model(model, device="cpu")(x)
    if kind == "torchscript":
        path = to_torchscript(model, run_dir / "model.torchscript.pt")
        with warnings.catch_warnings():  # torch.jit.load warns it is deprecated; it works
            warnings.simplefilter("ignore", FutureWarning)
            got = torch.jit.load(str(path))(x)
        return {
            "export": {
                "format": kind,
                "path": path.name,
                "input": INPUT,
                "max_abs_diff": float((got - reference).abs().max()),
            }
        }
    block = nchwc_block()
    path = to_onnx(model, run_dir / "model.onnx", pad_channels=block)
    info: dict[str, Any] = {"format": kind, "path": path.name, "input": INPUT}
    info["pad_channels"] = block  # factor chains' inner channels, for ONNX Runtime's kernels
    try:
        import onnxruntime as ort
    except ImportError:
        info["checked"] = "onnxruntime not installed: outputs not checked"
        return {"export": info}
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    info["max_abs_diff"] = float((got - reference).abs().max())
    for bs in LATENCY_BATCHES:
        xb = torch.randn(bs, 3, 32, 32).numpy()
        for _ in range(3):
            session.run(None, {"input": xb})
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            session.run(None, {"input": xb})
            times.append((time.perf_counter() - t0) * 1e3)
        info[f"onnxruntime_b{bs}_ms"] = statistics.median(times)
    return {"export": info}
