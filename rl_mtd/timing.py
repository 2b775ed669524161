"""How a device is timed, and what a timing there depends on: a ``Timer`` that runs a module's
inference form (``measured_timer``), the context a timing belongs to (``device_context``: the
CPU or GPU, threads, torch), and the size of the cache next to a core (``cache_bytes``).
``rl_mtd.latency`` builds its per-layer latency model on these and re-exports them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from rl_mtd.metrics import cpu_name

Timer = Callable[[nn.Module, tuple[int, ...]], float]
"""``(module, input shape N x C x H x W) -> milliseconds per forward pass``."""


def measured_timer(
    device: str | torch.device = "cpu",
    *,
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 10,
    rounds: int = 2,
) -> Timer:
    """A ``Timer`` that runs the inference form of the module on ``device``: the best of
    ``rounds`` medians of ``repeats`` passes after ``warmup`` (``rl_mtd.metrics.measure_latency``)."""
    from rl_mtd.export import inference_model
    from rl_mtd.metrics import measure_latency

    def timer(module: nn.Module, shape: tuple[int, ...]) -> float:
        net = inference_model(module.to(device))
        kw = dict(
            batch_size=shape[0],
            in_channels=shape[1],
            input_size=shape[2],
            device=device,
            threads=threads,
            warmup=warmup,
            repeats=repeats,
            channels_last=shape[1] > 3,
        )
        with torch.inference_mode():
            return min(measure_latency(net, **kw)["median_ms"] for _ in range(rounds))

    return timer


def device_context(device: str | torch.device) -> str:
    """What a timing on ``device`` depends on beyond the model and batch: the GPU's name, or the
    CPU's model name, count and torch's thread count; and the torch version."""
    device = torch.device(device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{cpu_name()} ({os.cpu_count()} CPUs) x{torch.get_num_threads()} threads"
    return f"{where}, torch {torch.__version__}"


SYSFS_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


def cache_bytes(device: str | torch.device) -> int | None:
    """Bytes of the cache next to one core (the CPU's L2, read from sysfs) or of the GPU's L2;
    None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        size = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
        return size or None
    for index in sorted(SYSFS_CACHES.glob("index*")):
        try:
            if (index / "level").read_text().strip() != "2":
                continue
            size = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        if size[-1:] in units and size[:-1].isdigit():
            return int(size[:-1]) * units[size[-1]]
        if size.isdigit():
            return int(size)
    return None
