"""The factor cache: factors by (kernel hash, method, rank, fit), in memory and on disk.

Re-decomposing the same layer at the same rank in every episode would waste most of a search,
so a layer is decomposed once across episodes, processes and runs. Disk entries are written
atomically, and a foreign, damaged or mis-shaped entry is a miss (recomputed), never a crash.
A data-aware fit (``rl_mtd.datafit``) adds a hash of the input moment it saw to the key;
weight-only keys are as they were, so existing caches stay valid.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from pathlib import Path

import torch

from rl_mtd.datafit import WHITEN_RIDGE
from rl_mtd.io import cache_dir, torch_save_atomic

log = logging.getLogger(__name__)

# Bump when a factorisation changes, so stale cached factors are not reused.
FACTOR_VERSION = 2


def weight_key(weight: torch.Tensor) -> str:
    """Content hash of a kernel: its shape, dtype and bytes."""
    w = weight.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(w.shape)}|{w.dtype}|v{FACTOR_VERSION}".encode())
    h.update(w.view(torch.uint8).numpy().tobytes() if w.numel() else b"")
    return h.hexdigest()


def moment_key(moment: torch.Tensor) -> str:
    """Short content hash of an input moment (its float64 bytes and the whitening ridge)."""
    m = moment.detach().to(device="cpu", dtype=torch.float64).contiguous()
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{tuple(m.shape)}|ridge{WHITEN_RIDGE!r}".encode())
    h.update(m.numpy().tobytes())
    return h.hexdigest()


class FactorCache:
    """Factors by (kernel hash, method, rank, fit): an LRU in memory over an optional disk store.

    Disk entries are written atomically (temp file, then rename), so several processes can share
    one directory: the worst case is two of them computing the same factors once each.
    """

    def __init__(self, directory: str | os.PathLike | None = None, max_items: int = 512):
        self.directory = Path(directory) if directory is not None else None
        self.max_items = max_items
        self._memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.disk_hits = 0
        self.misses = 0

    @staticmethod
    def key(
        wkey: str, method: str, rank: int | tuple[int, int] | None, mkey: str | None = None
    ) -> str:
        """The entry's name; ``mkey`` (a ``moment_key``) marks a data-aware fit."""
        r = "x".join(map(str, rank)) if isinstance(rank, tuple) else str(rank)
        return f"{wkey}-{method}-{r}" + (f"-d{mkey}" if mkey is not None else "")

    def _path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / key[:2] / f"{key}.pt"

    def get(
        self, key: str, expect: dict[str, tuple[int, ...]] | None = None
    ) -> dict[str, torch.Tensor] | None:
        """The factors stored under ``key``, or None (a miss).

        With ``expect`` (factor name -> shape), a disk entry that is not exactly such a dict of
        finite float tensors - a foreign, stale or hand-edited file - counts as a miss, so the
        caller recomputes and overwrites it instead of failing.
        """
        if key in self._memory:
            self._memory.move_to_end(key)
            self.hits += 1
            return self._memory[key]
        path = self._path(key)
        if path is not None and path.exists():
            try:
                value = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # a torn or foreign file: recompute rather than fail
                log.warning("ignoring unreadable cached factors %s (%s)", path, exc)
            else:
                problem = _factor_problem(value, expect) if expect is not None else None
                if problem is None:
                    self.disk_hits += 1
                    self._remember(key, value)
                    return value
                log.warning("ignoring cached factors %s: %s", path, problem)
        self.misses += 1
        return None

    def put(self, key: str, value: dict[str, torch.Tensor]) -> None:
        value = {k: v.detach().cpu() for k, v in value.items()}
        self._remember(key, value)
        path = self._path(key)
        if path is not None:
            try:
                torch_save_atomic(value, path)
            except OSError as exc:  # full disk or read-only cache: keep going from memory
                log.warning("could not write factor cache %s (%s)", path, exc)

    def _remember(self, key: str, value: dict[str, torch.Tensor]) -> None:
        self._memory[key] = value
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_items:
            self._memory.popitem(last=False)


_default_cache: FactorCache | None = None


def default_cache() -> FactorCache:
    """The process-wide cache, on disk under ``cache_dir()/factors``."""
    global _default_cache
    directory = cache_dir() / "factors"
    if _default_cache is None or _default_cache.directory != directory:
        _default_cache = FactorCache(directory)
    return _default_cache


def _factor_problem(found: object, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why ``found`` is not a usable factor dict of these shapes, or None when it is."""
    if not isinstance(found, dict):
        return f"expected a dict of tensors, found {type(found).__name__}"
    if set(found) != set(shapes):
        return f"expected tensors {sorted(shapes)}, found {sorted(map(str, found))}"
    for name, shape in shapes.items():
        t = found[name]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            return f"{name} should be a tensor of shape {shape}, found {got}"
        if not t.is_floating_point() or not torch.isfinite(t).all():
            return f"{name} is not a finite floating-point tensor"
    return None
