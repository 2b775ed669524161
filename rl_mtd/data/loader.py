"""Batches on the split's device: normalisation, augmentation and :class:`DeviceLoader`.

Images stay uint8 until a batch is drawn; the random crop and flip plus the normalisation then
run on the device with tensor ops, with no Python loop over images.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
from collections.abc import Iterator
from functools import lru_cache

import torch

from rl_mtd.data.splits import Split
from rl_mtd.errors import RlMtdError

# Per-channel statistics of the CIFAR-10 training set in [0, 1] units (true per-pixel std).
MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

PAD = 4  # random-crop padding, as in the standard CIFAR recipe

CHANNELS_LAST_ENV = "RL_MTD_CHANNELS_LAST"
_X86 = ("x86_64", "amd64")


def channels_last_inputs(device: torch.device | str) -> bool:
    """Whether the batches for a model on ``device`` are laid out channels_last (NHWC).

    Yes on CUDA (tensor-core convolutions; ``rl_mtd.train`` makes the weights channels_last
    there too) and on x86 CPUs with oneDNN, which then runs every conv of the net (the weights
    stay NCHW) and its backward pass in NHWC: measured on one 2-core AMD EPYC (AVX2), training
    steps 1.2-1.9x faster for VGG11 width 0.25 and its decomposed forms (0.98-1.13x for the
    full-width VGG16, 1.1-1.8x for its decomposed forms), BatchNorm re-estimates and evaluation
    1.4-3.4x (BENCHMARKS.md, "Training and evaluation in channels_last"). Other CPUs keep NCHW
    (not measured), as does a torch without oneDNN.

    Not bit for bit the NCHW arithmetic (a different summation order): a run differs from an
    NCHW one as two GPUs' runs do, a training state saved in one layout resumes in the other
    only to float tolerance, and data-aware factors (``--fit data``) cached under one layout
    are refitted under the other (their cache key hashes the input moments' exact bits).
    ``RL_MTD_CHANNELS_LAST=1`` or ``0`` overrides the choice for every device (``0`` on CUDA
    also keeps the weights NCHW while training).
    """
    forced = os.environ.get(CHANNELS_LAST_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise RlMtdError(
                f"{CHANNELS_LAST_ENV}={forced!r} is not understood; set it to 1 (channels_last "
                "batches) or 0 (NCHW batches), or unset it for the measured default"
            )
        return forced == "1"
    device = torch.device(device)
    if device.type == "cuda":
        return True
    onednn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    return device.type == "cpu" and onednn and platform.machine().lower() in _X86


@lru_cache(maxsize=8)
def _norm_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached per device so each batch does not copy the constants host-to-device again.
    mean = torch.tensor(MEAN, dtype=torch.float32, device=device).view(3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32, device=device).view(3, 1, 1)
    return mean, std


def normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """``(x / 255 - MEAN) / STD`` as float32 on ``x``'s device, for ``(3,H,W)`` or ``(N,3,H,W)``."""
    if x_uint8.dtype != torch.uint8:
        raise RlMtdError(
            f"normalize expects uint8 pixels, got {x_uint8.dtype}; pass the raw images "
            "(normalising twice would silently corrupt them)"
        )
    mean, std = _norm_constants(x_uint8.device)
    return x_uint8.float().div_(255.0).sub_(mean).div_(std)


def _random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = PAD) -> torch.Tensor:
    """Random crop after zero padding ``pad`` plus random horizontal flip, for a whole batch.

    One gather on the device: per-sample row and column indices into the padded batch, with
    the flip chosen by ``torch.where`` on a per-sample mask (reversed column indices), so there
    is no Python loop over images.
    """
    b, c, h, w = x.shape
    dev = x.device
    padded = x.new_zeros((b, c, h + 2 * pad, w + 2 * pad))
    padded[:, :, pad : pad + h, pad : pad + w] = x
    dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=dev)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator, device=dev)
    flip = torch.rand((b, 1), generator=generator, device=dev) < 0.5
    ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
    rows = dy + ar_h  # (b, h)
    cols = dx + torch.where(flip, ar_w.flip(0), ar_w)  # (b, w)
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
    ci = torch.arange(c, device=dev).view(1, c, 1, 1)
    return padded[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def _epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed per (seed, epoch), so neighbouring seeds give unrelated streams."""
    # The "rl_mtd.data" label is part of the seed: changing it would change every stream.
    digest = hashlib.sha256(f"rl_mtd.data:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class DeviceLoader:
    """Batches ``(normalised float32 images, int64 labels)`` drawn from a split on its device.

    Shuffling and augmentation use a ``torch.Generator`` on the split's device, seeded from
    ``seed`` and the epoch number: each pass differs, and a rerun repeats every pass exactly.
    The epoch counter starts at 0 and advances each time iteration starts.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        channels_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise RlMtdError(f"batch_size must be at least 1, got {batch_size}")
        self.split = split
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.seed = int(seed)
        self.channels_last = channels_last
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Not a generator function, so the epoch advances when iteration starts, not lazily.
        generator = torch.Generator(device=self.split.device)
        generator.manual_seed(_epoch_seed(self.seed, self.epoch))
        self.epoch += 1
        return self._batches(generator)

    def _batches(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y, bs = self.split.x, self.split.y, self.batch_size
        order = None
        if self.shuffle:
            order = torch.randperm(len(self.split), generator=generator, device=self.split.device)
        for start in range(0, len(self) * bs, bs):
            if order is None:
                xb, yb = x[start : start + bs], y[start : start + bs]
            else:
                idx = order[start : start + bs]
                xb, yb = x.index_select(0, idx), y.index_select(0, idx)
            if self.augment:
                xb = _random_crop_flip(xb, generator)
            out = normalize(xb)
            if self.channels_last:
                out = out.contiguous(memory_format=torch.channels_last)
            yield out, yb
