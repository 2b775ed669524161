"""A small, learnable, deterministic stand-in for CIFAR-10: ``"synthetic"`` or
``"synthetic:NTRAIN,NTEST"``.

Each class is a coloured sinusoidal grating, so a tiny CNN learns it in seconds; tests and
smoke runs use it where the real images are absent or too slow.
"""

from __future__ import annotations

import colorsys
import hashlib
import math

import torch

from rl_mtd.data.splits import CLASSES, IMAGE_SIZE, Cifar, Split
from rl_mtd.errors import RlMtdError

SYNTHETIC_DEFAULT = (2000, 500)  # training and test images of plain "synthetic"


def is_synthetic(spec: str) -> bool:
    """Whether a source string names the synthetic stand-in (well formed or not)."""
    spec = spec.strip().lower()
    return spec == "synthetic" or spec.startswith("synthetic:")


def parse_synthetic(text: str) -> tuple[int, int]:
    """``"synthetic"`` -> the default sizes; ``"synthetic:NTRAIN,NTEST"`` -> those."""
    if text.lower() == "synthetic":
        return SYNTHETIC_DEFAULT
    head, _, tail = text.partition(":")
    parts = tail.split(",")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        sizes = ()
    if head.lower() != "synthetic" or len(sizes) != 2 or min(sizes) < 1:
        raise RlMtdError(
            f"bad synthetic source {text!r}; use 'synthetic' or 'synthetic:NTRAIN,NTEST' with "
            "two positive integers, e.g. 'synthetic:2000,500'"
        )
    return sizes[0], sizes[1]


def synthetic(n_train: int, n_test: int) -> Cifar:
    """A deterministic 10-class stand-in for CIFAR-10 that a tiny CNN learns in seconds.

    Not cached: generating it takes milliseconds.
    """
    key = hashlib.sha256(f"synthetic-v1:{n_train},{n_test}".encode()).hexdigest()[:16]
    return Cifar(
        _synthetic_split(n_train, seed=0),
        _synthetic_split(n_test, seed=1),
        f"synthetic ({n_train} train, {n_test} test)",
        key,
        CLASSES,
    )


def _synthetic_split(n: int, seed: int) -> Split:
    """Class ``c``: a sinusoidal grating at angle ``c * 18`` degrees in hue ``c / 10``.

    Per image: a random phase (a shift of the pattern), colour jitter and pixel noise, so the
    class is learnable from colour and texture together but no two images are identical.
    """
    g = torch.Generator().manual_seed(seed)
    k = len(CLASSES)
    y = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    palette = torch.tensor([colorsys.hsv_to_rgb(c / k, 0.75, 0.9) for c in range(k)])
    angle = y.double() * math.pi / k
    freq = 2.0 + (y % 3).double()  # cycles per image
    phase = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
    coords = torch.arange(IMAGE_SIZE, dtype=torch.float64) / IMAGE_SIZE
    rows, cols = coords.view(1, -1, 1), coords.view(1, 1, -1)
    along = cols * torch.cos(angle).view(-1, 1, 1) + rows * torch.sin(angle).view(-1, 1, 1)
    wave = torch.sin(2 * math.pi * freq.view(-1, 1, 1) * along + phase.view(-1, 1, 1))
    colour = palette[y].double() + 0.08 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    img = colour.view(n, 3, 1, 1) * (0.6 + 0.35 * wave.unsqueeze(1))
    img = img + 0.06 * torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g, dtype=torch.float64)
    x = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return Split(x, y.to(torch.int64))
