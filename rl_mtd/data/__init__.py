"""CIFAR-10 as uint8 tensors: loading, caching, seeded splits and an on-device batch loader.

Images stay uint8 ``(N, 3, 32, 32)`` until a batch is drawn, so a whole split fits on a GPU
(150 MB for the training set) and augmentation plus normalisation run there, per batch, with
tensor ops. Sources that :func:`load_cifar10` accepts:

* ``None``: ``$RL_MTD_DATA`` if set, else torchvision's download into ``cache_dir()/torchvision``;
* ``"cifar10"``: torchvision's download;
* a directory that is, or holds, ``cifar-10-batches-py``: torchvision's format, no download;
* a directory with ``train/<class>/*`` and ``test/<class>/*``: ImageFolder layout;
* a ``.tar.gz``/``.tgz``/``.tar``/``.tar.bz2``/``.tar.xz``/``.zip`` archive in ImageFolder layout,
  optionally under one top-level folder; streamed, never extracted to disk;
* ``"synthetic"`` or ``"synthetic:NTRAIN,NTEST"``: a small, learnable, deterministic stand-in.

ImageFolder sources are decoded once and cached in ``cache_dir()/data/cifar10-<key>.pt``.

Modules: :mod:`.sources` (resolving a source, the cache, torchvision's format),
:mod:`.imagefolder` (decoding directories and archives), :mod:`.synthetic`, :mod:`.splits`
(the containers and seeded splits) and :mod:`.loader` (normalisation, augmentation, batches).
"""

from rl_mtd.data.loader import (
    CHANNELS_LAST_ENV,
    MEAN,
    PAD,
    STD,
    DeviceLoader,
    channels_last_inputs,
    normalize,
)
from rl_mtd.data.sources import _CACHE_VERSION as _CACHE_VERSION
from rl_mtd.data.sources import _archive_key as _archive_key
from rl_mtd.data.sources import load_cifar10
from rl_mtd.data.splits import CLASSES, IMAGE_SIZE, Cifar, DataSplits, Split, make_splits

__all__ = [
    "CHANNELS_LAST_ENV",
    "CLASSES",
    "IMAGE_SIZE",
    "MEAN",
    "PAD",
    "STD",
    "Cifar",
    "DataSplits",
    "DeviceLoader",
    "Split",
    "channels_last_inputs",
    "load_cifar10",
    "make_splits",
    "normalize",
]
