"""Reading a dataset source into uint8 tensors, with a cache keyed by the source's content.

See :mod:`rl_mtd.data` for the sources :func:`load_cifar10` accepts. ImageFolder directories
and archives are decoded once and cached in ``cache_dir()/data/cifar10-<key>.pt``; the key is
the archive's sha256, or for a directory a hash of its files' names, sizes and mtimes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rl_mtd.data.imagefolder import (
    ARCHIVE_SUFFIXES,
    FIX,
    LAYOUT,
    SPLITS,
    is_hidden,
    read_imagefolder,
)
from rl_mtd.data.splits import CLASSES, Cifar, Split
from rl_mtd.data.synthetic import SYNTHETIC_DEFAULT, is_synthetic, parse_synthetic, synthetic
from rl_mtd.errors import RlMtdError
from rl_mtd.io import DATA_ENV, cache_dir, torch_save_atomic

log = logging.getLogger(__name__)

_CACHE_VERSION = 1  # bump when decoding (imagefolder.py) changes, so stale caches are rebuilt


@dataclass(frozen=True)
class _Source:
    """A resolved data source: what kind it is and where."""

    kind: str  # "torchvision" | "folder" | "archive" | "synthetic"
    path: Path | None = None
    download: bool = False
    explicit: bool = True  # named by the user, rather than the default download
    sizes: tuple[int, int] = SYNTHETIC_DEFAULT


def load_cifar10(
    source: str | os.PathLike | None = None, *, download: bool = True, progress: bool = False
) -> Cifar:
    """Load CIFAR-10 (or a dataset in its layout) from ``source``; see :mod:`rl_mtd.data`.

    ``download`` only matters for the torchvision download; ``progress`` shows a tqdm bar while
    images are decoded. Raises :class:`RlMtdError` for a missing, malformed or corrupt source.
    """
    src = _resolve(source, download)
    if src.kind == "synthetic":
        return synthetic(*src.sizes)
    if src.kind == "torchvision":
        return _load_torchvision(src)
    assert src.path is not None
    if src.kind == "archive":
        key, description = _archive_key(src.path), f"archive {src.path}"
    else:
        key, description = _folder_key(src.path), f"ImageFolder directory {src.path}"
    cache_file = cache_dir() / "data" / f"cifar10-{key}.pt"
    cached = _read_cache(cache_file, description, key)
    if cached is not None:
        log.info("loaded %s from cache %s", description, cache_file)
        return cached
    log.info("decoding %s (once; cached afterwards in %s)", description, cache_file)
    archive = src.kind == "archive"
    train, test, classes = read_imagefolder(
        src.path, description, archive=archive, progress=progress
    )
    data = Cifar(train, test, description, key, classes)
    _write_cache(cache_file, data)
    return data


def _resolve(source: str | os.PathLike | None, download: bool) -> _Source:
    """Turn the user's ``source`` (or ``$RL_MTD_DATA``) into a :class:`_Source`."""
    origin = ""
    if source is None:
        env = os.environ.get(DATA_ENV, "").strip()
        if not env:
            root = cache_dir() / "torchvision"
            return _Source("torchvision", root, download=download, explicit=False)
        source, origin = env, f" (from ${DATA_ENV})"
    text = os.fspath(source)
    if text.strip().lower() == "cifar10":
        return _Source("torchvision", cache_dir() / "torchvision", download=download)
    if is_synthetic(text):
        return _Source("synthetic", sizes=parse_synthetic(text.strip()))
    path = Path(text).expanduser()
    if not path.exists():
        raise RlMtdError(f"data path {path}{origin} does not exist; {FIX}")
    if path.is_dir():
        return _resolve_dir(path)
    if path.name.lower().endswith(ARCHIVE_SUFFIXES):
        return _Source("archive", path)
    raise RlMtdError(
        f"unknown archive type for {path}{origin}; use a {'/'.join(ARCHIVE_SUFFIXES)} archive "
        f"in ImageFolder layout ({LAYOUT}), or a directory"
    )


def _resolve_dir(path: Path) -> _Source:
    """A directory is torchvision's format, an ImageFolder tree, or one folder around either."""
    if path.name == "cifar-10-batches-py":
        return _Source("torchvision", path.parent)
    if (path / "cifar-10-batches-py").is_dir():
        return _Source("torchvision", path)
    has = {s: (path / s).is_dir() for s in SPLITS}
    if any(has.values()):
        missing = [s for s in SPLITS if not has[s]]
        if missing:
            raise RlMtdError(
                f"directory {path} has no {missing[0]}/ folder ({LAYOUT}); add it, or {FIX}"
            )
        return _Source("folder", path)
    # Tolerate a single wrapping folder, as an unpacked archive often has.
    children = [c for c in path.iterdir() if c.is_dir() and not is_hidden(c.name)]
    if len(children) == 1 and all((children[0] / s).is_dir() for s in SPLITS):
        return _Source("folder", children[0])
    raise RlMtdError(
        f"directory {path} holds neither cifar-10-batches-py/ nor train/ and test/ folders "
        f"({LAYOUT}); {FIX}"
    )


def _archive_key(path: Path) -> str:
    """The first 16 hex digits of the archive's sha256: a content key, independent of path."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _folder_key(root: Path) -> str:
    """A hash of every file's relative path, size and mtime: cheap, and changes when files do."""
    digest = hashlib.sha256(b"imagefolder\n")
    for split in SPLITS:
        for dirpath, dirnames, filenames in os.walk(root / split, followlinks=True):
            dirnames.sort()
            for fname in sorted(filenames):
                file = Path(dirpath) / fname
                st = file.stat()
                rel = file.relative_to(root).as_posix()
                digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _read_cache(path: Path, description: str, key: str) -> Cifar | None:
    """The cached dataset, or None when the file is absent, unreadable, stale or malformed."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("version") != _CACHE_VERSION:
            raise ValueError(f"cache format {blob.get('version')}, expected {_CACHE_VERSION}")
        classes = tuple(str(c) for c in blob["classes"])
        train = Split(blob["train_x"], blob["train_y"])
        test = Split(blob["test_x"], blob["test_y"])
        for split in (train, test):
            if len(split) and not 0 <= int(split.y.min()) <= int(split.y.max()) < len(classes):
                raise ValueError("labels out of range")
    # Any failure (truncated file, unpickling error, wrong fields) just means "rebuild it".
    except Exception as exc:  # noqa: BLE001
        log.warning("ignoring unreadable cache file %s (%s); rebuilding it", path, exc)
        return None
    return Cifar(train, test, description, key, classes)


def _write_cache(path: Path, data: Cifar) -> None:
    """Save the decoded tensors; a failure (read-only or full disk) costs only speed."""
    blob = {
        "version": _CACHE_VERSION,
        "classes": list(data.classes),
        "train_x": data.train.x.cpu(),
        "train_y": data.train.y.cpu(),
        "test_x": data.test.x.cpu(),
        "test_y": data.test.y.cpu(),
    }
    try:
        torch_save_atomic(blob, path)
    except OSError as exc:
        log.warning("could not write cache file %s (%s); the next load decodes again", path, exc)
    else:
        log.info("cached decoded images in %s", path)


def _load_torchvision(src: _Source) -> Cifar:
    """torchvision's CIFAR-10 under ``src.path`` (downloading it there if ``src.download``)."""
    from torchvision.datasets import CIFAR10  # deferred: importing torchvision is slow

    root = src.path
    assert root is not None
    try:
        sets = [CIFAR10(str(root), train=t, download=src.download) for t in (True, False)]
    # torchvision raises URLError/OSError offline, RuntimeError when files are missing or bad,
    # and tarfile errors for a broken download: all mean "no usable CIFAR-10 here".
    except Exception as exc:  # noqa: BLE001
        if src.download:
            problem = f"CIFAR-10 could not be downloaded into {root} ({exc})"
        elif src.explicit:
            problem = f"torchvision CIFAR-10 in {root} is missing or corrupt ({exc})"
        else:
            problem = f"CIFAR-10 is not in {root} and downloading is off"
        raise RlMtdError(f"{problem}; {FIX}") from exc
    train, test = (
        Split(
            torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous(),
            torch.as_tensor(ds.targets, dtype=torch.int64),
        )
        for ds in sets
    )
    key = "torchvision-" + _folder_key_torchvision(root / "cifar-10-batches-py")
    return Cifar(train, test, f"torchvision CIFAR-10 in {root}", key, CLASSES)


def _folder_key_torchvision(folder: Path) -> str:
    """A key for torchvision's batch files (name, size, mtime), for symmetry with other sources."""
    digest = hashlib.sha256(b"torchvision\n")
    for file in sorted(folder.iterdir()) if folder.is_dir() else []:
        st = file.stat()
        digest.update(f"{file.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
