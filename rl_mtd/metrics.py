"""Counting parameters and multiply-accumulates, and measuring latency.

What is counted:
- parameters: every trainable tensor of the model (convs, BatchNorm affine, the head); running
  statistics are buffers and are not counted.
- MACs: multiply-accumulates of ``nn.Conv2d`` and ``nn.Linear`` layers for one image of
  ``input_shape`` (batch 1); BatchNorm, ReLU and pooling are not counted.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from rl_mtd.models import model_device


def count_params(model: nn.Module) -> int:
    """Trainable parameters of the whole model."""
    return sum(p.numel() for p in model.parameters())


def _module_macs(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        per_output = (module.in_channels // module.groups) * kh * kw
        return int(output[0].numel()) * per_output
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features
    return 0


@torch.no_grad()
def macs_by_layer(
    model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)
) -> OrderedDict[str, int]:
    """MACs of every conv and linear layer for one input, keyed by module name, in call order.

    Output shapes come from one forward pass of a single zero image.
    """
    found: OrderedDict[str, int] = OrderedDict()
    names = {m: n for n, m in model.named_modules()}
    hooks = []

    def hook(module: nn.Module, _inp, out):
        found[names[module]] = found.get(names[module], 0) + _module_macs(module, out)

    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        model.eval()
        model(torch.zeros((1, *input_shape[1:]), device=model_device(model), dtype=dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return found


def count_macs(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> int:
    """Total conv and linear MACs for one image of ``input_shape``."""
    return sum(macs_by_layer(model, input_shape).values())


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    *,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    warmup: int = 5,
    repeats: int = 20,
    input_size: int = 32,
    in_channels: int = 3,
    threads: int | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Median and spread (10th and 90th percentiles) of forward-pass wall time in milliseconds.

    ``warmup`` untimed passes first; on the CPU, ``threads`` fixes torch's intra-op threads for
    the measurement (restored afterwards), so two measurements compare like with like. On CUDA
    each pass is timed with CUDA events and synchronised. The input is ``batch_size`` x
    ``in_channels`` x ``input_size`` x ``input_size`` normal noise (one layer of a net can be
    timed on its own input shape), stored channels_last with ``channels_last``.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    x = torch.randn(batch_size, in_channels, input_size, input_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    before = torch.get_num_threads()
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    # Events record on the current device's stream: make that the model's GPU (cuda:1 too).
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    try:
        with on_device:
            for _ in range(warmup):
                model(x)
            sync()
            times = []
            for _ in range(repeats):
                if device.type == "cuda":  # the GPU's own clock: no host-side launch jitter
                    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                    start.record()
                    model(x)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                    continue
                t0 = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(before)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p10_ms": times[len(times) // 10],
        "p90_ms": times[(len(times) * 9) // 10],
        "batch_size": float(batch_size),
        "repeats": float(repeats),
        "threads": float(torch.get_num_threads() if threads is None else threads),
    }


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds the machine was busy or stolen by its host, CPU seconds of this process).

    From /proc/stat (user, nice, system, irq, softirq and steal; guest time is already inside
    user and nice); None where it cannot be read. Processes of other containers on the same
    machine count, though ``ps`` does not show them.
    """
    try:
        import resource  # Unix only

        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        busy = sum(fields[i] for i in (0, 1, 2, 5, 6, 7))
    except (ImportError, OSError, ValueError, IndexError):
        return None
    own = resource.getrusage(resource.RUSAGE_SELF)
    return busy / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime


def others_cpu_share(before: tuple[float, float] | None, seconds: float) -> float | None:
    """Share of all CPUs that other processes kept busy since ``before`` (``seconds`` ago)."""
    after = cpu_seconds()
    if before is None or after is None or seconds <= 0:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others) / (seconds * (os.cpu_count() or 1))


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one, else the platform's)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
