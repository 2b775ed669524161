"""The in-memory datasets and how the training images are split.

:class:`Split` holds one set of uint8 images with their labels, :class:`Cifar` a loaded dataset
(both splits, where it came from, its class names), and :func:`make_splits` cuts the training
images into disjoint train and proxy parts by a seeded permutation (:class:`DataSplits`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rl_mtd.errors import RlMtdError

# torchvision's label order, which is also alphabetical: sorted ImageFolder class names agree.
CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_SIZE = 32


@dataclass
class Split:
    """Images ``x`` (uint8, ``(N, 3, H, W)``) and labels ``y`` (int64, ``(N,)``) on one device."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4 or self.x.shape[1] != 3:
            raise RlMtdError(
                f"Split.x must be uint8 (N, 3, H, W), got {self.x.dtype} {tuple(self.x.shape)}; "
                "keep images as raw uint8 pixels and normalise per batch"
            )
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise RlMtdError(
                f"Split.y must be int64 of shape ({self.x.shape[0]},), got {self.y.dtype} "
                f"{tuple(self.y.shape)}; pass one integer label per image"
            )
        if self.x.device != self.y.device:
            raise RlMtdError(
                f"Split.x is on {self.x.device} but Split.y on {self.y.device}; "
                "use Split.to(device) to move both"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Split:
        """Both tensors on ``device`` (no copy where they are there already)."""
        return Split(
            self.x.to(device, non_blocking=non_blocking),
            self.y.to(device, non_blocking=non_blocking),
        )


@dataclass
class Cifar:
    """A loaded dataset: both splits, where it came from, and its cache key.

    ``classes`` names label ``i`` as ``classes[i]``; it is :data:`CLASSES` for CIFAR-10 sources.
    """

    train: Split
    test: Split
    source: str
    key: str
    classes: tuple[str, ...] = CLASSES

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class DataSplits:
    """Disjoint train and proxy parts of the training images, plus the (optionally subset) test."""

    train: Split
    proxy: Split
    test: Split

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DataSplits:
        return DataSplits(
            self.train.to(device, non_blocking),
            self.proxy.to(device, non_blocking),
            self.test.to(device, non_blocking),
        )


def make_splits(
    data: Cifar,
    *,
    proxy_size: int = 5000,
    seed: int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
) -> DataSplits:
    """Split the training images into disjoint proxy and train parts by a seeded permutation.

    The first ``proxy_size`` images of the permutation form the proxy (used to score compressed
    nets without touching the test set); the rest, or the first ``train_size`` of them, the
    training part. ``test_size`` takes a seeded subset of the test set. The same seed always
    gives the same splits.
    """
    n = len(data.train)
    if not 0 <= proxy_size < n:
        raise RlMtdError(
            f"proxy_size={proxy_size} must be between 0 and {n - 1} (the dataset has {n} training "
            "images and training needs at least one); choose a smaller proxy size"
        )
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    proxy_idx, train_idx = perm[:proxy_size], perm[proxy_size:]
    if train_size is not None:
        _check_size("train_size", train_size, len(train_idx), "training images left after proxy")
        train_idx = train_idx[:train_size]
    test = data.test
    if test_size is not None:
        _check_size("test_size", test_size, len(test), "test images")
        test = _take(test, torch.randperm(len(test), generator=g)[:test_size])
    return DataSplits(_take(data.train, train_idx), _take(data.train, proxy_idx), test)


def _check_size(name: str, value: int, available: int, what: str) -> None:
    if not 1 <= value <= available:
        raise RlMtdError(
            f"{name}={value} is out of range: there are {available} {what}; "
            f"choose {name} between 1 and {available}"
        )


def _take(split: Split, idx: torch.Tensor) -> Split:
    idx = idx.to(split.device)
    return Split(split.x.index_select(0, idx), split.y.index_select(0, idx))
