"""A per-layer latency model of a VGG on one device: what a latency budget adds up.

MACs are a poor guide to speed on a CPU at batch 1 (early layers with large feature maps gain
little from decomposition; BENCHMARKS.md, "A latency table per layer"). This model times each
conv layer alone, on its own input shape, in the inference form it would run in
(``rl_mtd.export.inference_model`` of the conv or its decomposed block with the layer's
BatchNorm and ReLU), once per (layer, method, rank), and predicts a whole model's latency as

    rest + sum over layers of (the layer's time alone + per_byte * its weight bytes beyond cache)

``rest`` (pooling, the head, Python) is what a small compressed model takes beyond its layers
(at most what the original takes beyond its own). Inside the net a layer runs slower than alone,
where its weights stay in cache between passes; inside, a layer whose weights do not fit the
cache next to the core (``cache_bytes``: the CPU's L2, the GPU's L2) streams them in each pass.
``per_byte`` is calibrated so the original is predicted as measured, and charges a decomposed
block with large factors as it charges a kept layer (at batch 1 on this CPU this cut the median
error over 24 compressed VGG16s from 10.1% to 4.1%; BENCHMARKS.md). When no layer of the
original is larger than the cache (or its size is unknown), the kept layers' times are scaled instead
(``keep_scale``). Only a grid of ranks is timed per layer and
method (those of ``GRID_LEVELS`` parameter reductions, all at once when the layer and method are
first asked for); another rank, such as one settling raised a step, is interpolated in its
parameter count between the grid ranks around it (the kept layer above the weakest). Measured on
demand and memoised; ``path`` keeps the measurements between runs (they belong to one machine,
device, batch size and thread count, which the file records and checks).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rl_mtd.budget import DEFAULT_LEVELS, conv_input_sizes
from rl_mtd.decompose import (
    build_decomposed,
    conv_layers,
    decomposed_params,
    layer_params,
    rank_for_ratio,
)
from rl_mtd.errors import RlMtdError
from rl_mtd.io import write_json_atomic
from rl_mtd.metrics import cpu_seconds, others_cpu_share
from rl_mtd.timing import Timer as Timer  # re-exported
from rl_mtd.timing import cache_bytes as cache_bytes  # re-exported
from rl_mtd.timing import device_context as device_context  # re-exported
from rl_mtd.timing import measured_timer as measured_timer  # re-exported

log = logging.getLogger(__name__)

FORMAT = 1
GRID_LEVELS = DEFAULT_LEVELS
"""Per-layer parameter reductions whose ranks are timed; others are interpolated."""
BYTES_PER_WEIGHT = 4
"""float32 weights (what the timed inference forms hold on the CPU)."""
BUSY_LIMIT = 0.25
"""Share of the CPUs other processes may use while the model times on the CPU before its
timings are called untrustworthy: a warning, and nothing is written to ``path``."""


def layer_block(model: nn.Module, name: str, body: nn.Module) -> nn.Module:
    """``body`` (the conv ``name`` of ``model``, or what replaces it) followed by copies of the
    BatchNorm and ReLU that follow that conv in its Sequential: one layer as the net runs it."""
    parent_name, _, idx = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if not isinstance(parent, nn.Sequential):
        return nn.Sequential(body).eval()
    tail: list[nn.Module] = []
    for m in list(parent)[int(idx) + 1 :]:
        if not isinstance(m, nn.BatchNorm2d | nn.ReLU):
            break
        tail.append(copy.deepcopy(m))
    return nn.Sequential(body, *tail).eval()


def cache_path(net: str, width: float, batch_size: int, device: str | torch.device) -> Path:
    """Where the cache keeps a net's timings for one batch size on ``device`` in this context
    (``device_context``: one file per CPU and thread count, or GPU, and torch version)."""
    from rl_mtd.io import cache_dir

    device = torch.device(device)
    tag = hashlib.sha256(device_context(device).encode()).hexdigest()[:8]
    return cache_dir() / "latency" / f"{net}-w{width:g}-b{batch_size}-{device.type}-{tag}.json"


def _signature(model: nn.Module) -> str:
    shapes = [(name, tuple(conv.weight.shape)) for name, conv in conv_layers(model)]
    return hashlib.sha256(repr(shapes).encode()).hexdigest()[:16]


class LatencyModel:
    """Predicted forward time of ``model`` compressed by per-layer ``(method, rank)`` choices.

    Args:
        model: the original network (a VGG from ``build_vgg``; any model whose convs sit in
            Sequentials with their BatchNorm and ReLU after them works).
        batch_size: the batch the latency is for.
        timer: how a module is timed (default ``measured_timer(device)``); tests pass a
            deterministic one.
        device: where the default timer runs (the model's device by default).
        path: a JSON file that keeps the measurements between runs (read if it matches this
            model, batch size and ``context``; rewritten as new layers are timed).
        context: what else the numbers depend on (machine, threads, torch version): a file made
            in another context is ignored, not trusted.
        cache: bytes of weights a layer keeps in cache inside the net (default
            ``cache_bytes(device)``; where that is unknown, the kept layers are scaled instead).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_size: int = 1,
        timer: Timer | None = None,
        device: str | torch.device | None = None,
        path: str | Path | None = None,
        context: str = "",
        cache: int | None = None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise RlMtdError(f"latency batch size must be a whole number >= 1, got {batch_size!r}")
        self.model = copy.deepcopy(model).eval()
        if device is None:
            device = next(self.model.parameters()).device
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.timer = timer or measured_timer(self.device)
        self.cache = cache_bytes(self.device) if cache is None else int(cache)
        """Bytes of a layer's weights that stay in cache inside the net (None: unknown)."""
        self.convs = conv_layers(self.model)
        sizes = conv_input_sizes(self.model)
        self.shapes = {name: (conv.in_channels, *sizes[name]) for name, conv in self.convs}
        self.path = Path(path) if path is not None else None
        self.key = {
            "format": FORMAT,
            "model": _signature(self.model),
            "batch_size": batch_size,
            "context": context,
        }
        self._ms: dict[str, float] = {}
        self._grids: dict[tuple[str, str], list[tuple[int, Any]]] = {}
        self._whole: dict[str, float] = {}
        self.seconds = 0.0
        """Wall seconds spent timing every measurement this model holds, those read from
        ``path`` included: what a search that uses it is charged, as for the study."""
        self._load()
        self.busy: float | None = None
        """Share of the CPUs other processes used while this model timed (CPU only)."""
        self._timing_s = 0.0
        # Only this module's own timer on the CPU is judged; a caller's timer is theirs.
        self._before = cpu_seconds() if self.device.type == "cpu" and timer is None else None
        self._t_start = time.perf_counter()
        self.original_ms = self._whole_ms("original", self.model)
        small = [
            (name, "tucker2", rank_for_ratio(conv, "tucker2", 64.0)) for name, conv in self.convs
        ]
        small_model = self._compressed(small)
        small_sum = sum(self._timed(n, m, r) for n, m, r in small)
        kept = sum(self.layer_ms(name, "keep", None) for name, _ in self.convs)
        # Never more than the original leaves beside its layers: inside the net a layer runs
        # no faster than alone (keep_scale >= 1), whatever noise the small model's timing had.
        small_rest = self._whole_ms("small", small_model) - small_sum
        self.rest_ms = min(max(0.0, small_rest), max(0.0, self.original_ms - kept))
        streamed = sum(self._streamed(name, "keep", None) for name, _ in self.convs)
        excess = self.original_ms - self.rest_ms - kept
        # Inside the net the layers whose weights leave the cache pay for it; where none does
        # (or the cache is unknown, or the net runs faster than its layers alone) the kept
        # layers are scaled so that the original is still predicted as measured.
        self.per_byte_ms = excess / streamed if streamed > 0 and excess > 0 else 0.0
        """Milliseconds per weight byte beyond ``cache`` in a layer (0: not charged)."""
        self.keep_scale = (
            1.0 if self.per_byte_ms > 0 else max(1e-9, self.original_ms - self.rest_ms) / kept
        )
        self._save()

    # ------------------------------------------------------------------ timing
    def layer_ms(self, name: str, method: str, rank: Any) -> float:
        """Time of layer ``name`` alone as ``method`` at ``rank`` (``keep``: the layer itself):
        measured for the kept layer and grid ranks, interpolated for others."""
        if method == "keep":
            return self._timed(name, "keep", None)
        conv = self._conv(name)
        grid = self._grid(name, method)  # (params, rank), increasing
        for _, r in grid:
            self._timed(name, method, r)  # the whole grid at once: the same set every run
        if self._key(name, method, rank) in self._ms:
            return self._ms[self._key(name, method, rank)]
        points = [(p, self._ms[self._key(name, method, r)]) for p, r in grid]
        points.append((layer_params(conv), self._timed(name, "keep", None)))
        size = decomposed_params(conv, method, rank)
        if size <= points[0][0]:
            return points[0][1]
        for (p0, t0), (p1, t1) in zip(points, points[1:]):
            if p0 <= size <= p1:
                return t0 if p1 == p0 else t0 + (t1 - t0) * (size - p0) / (p1 - p0)
        return points[-1][1]

    def _grid(self, name: str, method: str) -> list[tuple[int, Any]]:
        if (name, method) not in self._grids:
            self._grids[(name, method)] = self._make_grid(name, method)
        return self._grids[(name, method)]

    def _make_grid(self, name: str, method: str) -> list[tuple[int, Any]]:
        conv = self._conv(name)
        ranks = {json.dumps(rank_for_ratio(conv, method, lv)): lv for lv in GRID_LEVELS}
        grid = [
            (decomposed_params(conv, method, rank_for_ratio(conv, method, lv)), json.loads(k))
            for k, lv in ranks.items()
        ]
        return sorted((p, tuple(r) if isinstance(r, list) else r) for p, r in grid)

    def _conv(self, name: str) -> nn.Conv2d:
        conv = dict(self.convs).get(name)
        if conv is None:
            raise RlMtdError(f"the latency model's network has no conv layer {name!r}")
        return conv

    @staticmethod
    def _key(name: str, method: str, rank: Any) -> str:
        return f"{name}|{method}|{json.dumps(None if method == 'keep' else rank)}"

    def _timed(self, name: str, method: str, rank: Any) -> float:
        key = self._key(name, method, rank)
        if key not in self._ms:
            conv = self._conv(name)
            body = copy.deepcopy(conv) if method == "keep" else build_decomposed(conv, method, rank)
            block = layer_block(self.model, name, body)
            t0 = time.perf_counter()
            ms = float(self.timer(block, (self.batch_size, *self.shapes[name])))
            self._timing_s += time.perf_counter() - t0
            self.seconds += time.perf_counter() - t0
            if not (ms >= 0 and ms < float("inf")):
                raise RlMtdError(f"timing {key} gave {ms!r} ms")
            self._ms[key] = ms
            self._dirty = True
        return self._ms[key]

    def _whole_ms(self, label: str, model: nn.Module) -> float:
        if label not in self._whole:
            t0 = time.perf_counter()
            self._whole[label] = float(self.timer(model, (self.batch_size, 3, 32, 32)))
            self._timing_s += time.perf_counter() - t0
            self.seconds += time.perf_counter() - t0
            self._dirty = True
        return self._whole[label]

    def _compressed(self, choices: Sequence[tuple[str, str, Any]]) -> nn.Module:
        from rl_mtd.policy import _set_module

        out = copy.deepcopy(self.model)
        for name, method, rank in choices:
            if method != "keep":
                conv = dict(self.convs)[name]
                _set_module(out, name, build_decomposed(conv, method, rank))
        return out.eval()

    # ------------------------------------------------------------------ prediction
    def _streamed(self, name: str, method: str, rank: Any) -> int:
        """Weight bytes of layer ``name`` as ``method`` at ``rank`` beyond the cache."""
        conv = self._conv(name)
        params = layer_params(conv) if method == "keep" else decomposed_params(conv, method, rank)
        return 0 if self.cache is None else max(0, BYTES_PER_WEIGHT * params - self.cache)

    def cost(self, index: int, method: str, rank: Any) -> float:
        """Layer ``index``'s share of the predicted time as ``method`` at ``rank``."""
        name = self.convs[index][0]
        streamed = self.per_byte_ms * self._streamed(name, method, rank)
        if method == "keep":
            return self.keep_scale * self.layer_ms(name, "keep", None) + streamed
        return self.layer_ms(name, method, rank) + streamed

    def predict(self, choices: Sequence[tuple[str, Any]]) -> float:
        """Predicted milliseconds per batch for one ``(method, rank)`` per conv layer."""
        if len(choices) != len(self.convs):
            raise RlMtdError(f"{len(choices)} choices for {len(self.convs)} conv layers")
        return self.rest_ms + sum(self.cost(i, m, r) for i, (m, r) in enumerate(choices))

    def speedup(self, choices: Sequence[tuple[str, Any]]) -> float:
        """The original's measured time / the predicted time of ``choices``."""
        return self.original_ms / self.predict(choices)

    def describe(self) -> str:
        busy = "" if self.busy is None else f"; others used {self.busy:.0%} of the CPUs meanwhile"
        return (
            f"latency model at batch {self.batch_size} on {self.device}: original "
            f"{self.original_ms:.3g} ms, rest {self.rest_ms:.3g} ms, kept layers x"
            f"{self.keep_scale:.2f}, {self.per_byte_ms * 2**20:.3g} ms per MiB of a layer's weights "
            f"beyond {'an unknown' if self.cache is None else f'{self.cache / 2**20:g} MiB of'} "
            f"cache, {len(self._ms)} blocks timed{busy}"
        )

    def _check_busy(self) -> None:
        """Measure how busy others kept the CPUs since the last check while this model timed;
        warn and keep the timings out of ``path`` when too busy (they would mislead every
        later run). Called before every write, so blocks timed later (a layer's grid when the
        search first asks for it) are judged too."""
        if self._before is None or self._timing_s < 0.05:
            return  # a GPU, a caller's timer, or (almost) nothing timed since the last check
        self.busy = others_cpu_share(self._before, time.perf_counter() - self._t_start)
        self._before, self._t_start, self._timing_s = cpu_seconds(), time.perf_counter(), 0.0
        if self.busy is not None and self.busy > BUSY_LIMIT:
            log.warning(
                "other processes used %.0f%% of the CPUs while the layers were timed: the "
                "latency model is not trustworthy and is not cached; rerun on an idle machine",
                100 * self.busy,
            )
            self.path = None

    # ------------------------------------------------------------------ persistence
    def _load(self) -> None:
        self._dirty = False
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            if data.get("key") != self.key:
                return  # another model, batch or machine: measure afresh
            self._ms = {str(k): float(v) for k, v in data["layers"].items()}
            self._whole = {str(k): float(v) for k, v in data["whole"].items()}
            self.seconds = float(data.get("seconds", 0.0))  # files before it was recorded: 0
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self._ms, self._whole = {}, {}  # a damaged file is measured again, not trusted
            self.seconds = 0.0

    def _save(self) -> None:
        if self.path is None or not self._dirty:
            return
        self._check_busy()
        if self.path is None:
            return
        write_json_atomic(
            self.path,
            {"key": self.key, "layers": self._ms, "whole": self._whole, "seconds": self.seconds},
        )
        self._dirty = False

    def measurements(self) -> dict[str, float]:
        """Every block timed so far: ``"layer|method|rank"`` -> milliseconds."""
        return dict(self._ms)

    def save(self) -> None:
        """Write the measurements made since the last save (no-op without ``path``)."""
        self._save()
