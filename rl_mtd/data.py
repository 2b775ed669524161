"""CIFAR-10 as uint8 tensors: loading, caching, seeded splits and an on-device batch loader.

Images stay uint8 ``(N, 3, 32, 32)`` until a batch is drawn, so a whole split fits on a GPU
(150 MB for the training set) and augmentation plus normalisation run there, per batch, with
tensor ops. Sources:

* ``None``: ``$RL_MTD_DATA`` if set, else torchvision's download into ``cache_dir()/torchvision``;
* ``"cifar10"``: torchvision's download;
* a directory that is, or holds, ``cifar-10-batches-py``: torchvision's format, no download;
* a directory with ``train/<class>/*`` and ``test/<class>/*``: ImageFolder layout;
* a ``.tar.gz``/``.tgz``/``.tar``/``.tar.bz2``/``.tar.xz``/``.zip`` archive in ImageFolder layout,
  optionally under one top-level folder; streamed, never extracted to disk;
* ``"synthetic"`` or ``"synthetic:NTRAIN,NTEST"``: a small, learnable, deterministic stand-in.

ImageFolder sources are decoded once and cached in ``cache_dir()/data/cifar10-<key>.pt``.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import logging
import math
import os
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from rl_mtd.errors import RlMtdError
from rl_mtd.io import DATA_ENV, cache_dir, torch_save_atomic

log = logging.getLogger(__name__)

# torchvision's label order, which is also alphabetical: sorted ImageFolder class names agree.
CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
# Per-channel statistics of the CIFAR-10 training set in [0, 1] units (true per-pixel std).
MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

IMAGE_SIZE = 32
PAD = 4  # random-crop padding, as in the standard CIFAR recipe

_SPLITS = ("train", "test")
_CACHE_VERSION = 1  # bump when decoding changes, so stale cache files are rebuilt
_TAR_MODES = {".tar.gz": "r|gz", ".tgz": "r|gz", ".tar": "r|", ".tar.bz2": "r|bz2",
              ".tar.xz": "r|xz"}  # fmt: skip
_ARCHIVE_SUFFIXES = (*_TAR_MODES, ".zip")
_IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp"}
)
_SYNTHETIC_DEFAULT = (2000, 500)
_FIX = (
    "pass --data PATH (a torchvision CIFAR-10 folder, an ImageFolder directory, or a "
    f".tar.gz/.zip archive with train/ and test/) or set {DATA_ENV}"
)
_LAYOUT = "expected train/<class>/<image> and test/<class>/<image>"


# --------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """A resolved data source: what kind it is and where."""

    kind: str  # "torchvision" | "folder" | "archive" | "synthetic"
    path: Path | None = None
    download: bool = False
    explicit: bool = True  # named by the user, rather than the default download
    sizes: tuple[int, int] = _SYNTHETIC_DEFAULT


def load_cifar10(
    source: str | os.PathLike | None = None, *, download: bool = True, progress: bool = False
) -> Cifar:
    """Load CIFAR-10 (or a dataset in its layout) from ``source``; see the module docstring.

    ``download`` only matters for the torchvision download; ``progress`` shows a tqdm bar while
    images are decoded. Raises :class:`RlMtdError` for a missing, malformed or corrupt source.
    """
    src = _resolve(source, download)
    if src.kind == "synthetic":
        return _synthetic(*src.sizes)
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
    images = _Images(description)
    if src.kind == "archive":
        _read_archive(src.path, images, progress)
    else:
        _read_folder(src.path, images, progress)
    train, test, classes = images.build()
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
    spec = text.strip().lower()
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return _Source("synthetic", sizes=_parse_synthetic(text.strip()))
    path = Path(text).expanduser()
    if not path.exists():
        raise RlMtdError(f"data path {path}{origin} does not exist; {_FIX}")
    if path.is_dir():
        return _resolve_dir(path)
    if path.name.lower().endswith(_ARCHIVE_SUFFIXES):
        return _Source("archive", path)
    raise RlMtdError(
        f"unknown archive type for {path}{origin}; use a {'/'.join(_ARCHIVE_SUFFIXES)} archive "
        f"in ImageFolder layout ({_LAYOUT}), or a directory"
    )


def _resolve_dir(path: Path) -> _Source:
    """A directory is torchvision's format, an ImageFolder tree, or one folder around either."""
    if path.name == "cifar-10-batches-py":
        return _Source("torchvision", path.parent)
    if (path / "cifar-10-batches-py").is_dir():
        return _Source("torchvision", path)
    has = {s: (path / s).is_dir() for s in _SPLITS}
    if any(has.values()):
        missing = [s for s in _SPLITS if not has[s]]
        if missing:
            raise RlMtdError(
                f"directory {path} has no {missing[0]}/ folder ({_LAYOUT}); add it, or {_FIX}"
            )
        return _Source("folder", path)
    # Tolerate a single wrapping folder, as an unpacked archive often has.
    children = [c for c in path.iterdir() if c.is_dir() and not _hidden(c.name)]
    if len(children) == 1 and all((children[0] / s).is_dir() for s in _SPLITS):
        return _Source("folder", children[0])
    raise RlMtdError(
        f"directory {path} holds neither cifar-10-batches-py/ nor train/ and test/ folders "
        f"({_LAYOUT}); {_FIX}"
    )


def _parse_synthetic(text: str) -> tuple[int, int]:
    """``"synthetic"`` -> the default sizes; ``"synthetic:NTRAIN,NTEST"`` -> those."""
    if text.lower() == "synthetic":
        return _SYNTHETIC_DEFAULT
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


def _hidden(name: str) -> bool:
    """Dot-files and macOS zip debris are never images of the dataset."""
    return name.startswith(".") or name == "__MACOSX"


# --------------------------------------------------------------------------------------------
# Decoding ImageFolder sources
# --------------------------------------------------------------------------------------------


@dataclass
class _Images:
    """Decoded images of one source by split and class, stacked in a fixed order at the end.

    The order (label, then path within the class folder) does not depend on the order of an
    archive's members, so a directory and an archive of the same files give the same tensors.
    """

    origin: str
    found: dict[str, dict[str, list[tuple[str, np.ndarray]]]] = field(
        default_factory=lambda: {s: {} for s in _SPLITS}
    )

    def add(self, split: str, cls: str, name: str, data: bytes, where: str) -> None:
        self.found[split].setdefault(cls, []).append((name, _decode_image(data, where)))

    def build(self) -> tuple[Split, Split, tuple[str, ...]]:
        for split in _SPLITS:
            if not self.found[split]:
                raise RlMtdError(
                    f"{self.origin} has no images under {split}/<class>/ ({_LAYOUT}); add the "
                    f"{split} images, or {_FIX}"
                )
        classes = tuple(sorted(self.found["train"]))
        if len(classes) < 2:
            raise RlMtdError(
                f"{self.origin} has only one class folder under train/ ({classes[0]}); a "
                "classifier needs at least 2 class folders"
            )
        unknown = sorted(set(self.found["test"]) - set(classes))
        if unknown:
            raise RlMtdError(
                f"{self.origin} has test/ classes that train/ lacks: {', '.join(unknown)}; "
                "use the same class folders in both"
            )
        return self._stack("train", classes), self._stack("test", classes), classes

    def _stack(self, split: str, classes: tuple[str, ...]) -> Split:
        arrays: list[np.ndarray] = []
        labels: list[int] = []
        for label, cls in enumerate(classes):
            items = sorted(self.found[split].get(cls, []), key=lambda item: item[0])
            arrays.extend(arr for _, arr in items)
            labels.extend([label] * len(items))
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        return Split(x, torch.tensor(labels, dtype=torch.int64))


def _decode_image(data: bytes, where: str) -> np.ndarray:
    """One image file's bytes as uint8 ``(32, 32, 3)`` RGB; RlMtdError if it cannot be."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            arr = np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise RlMtdError(
            f"cannot decode image {where} ({exc}); replace or delete that file"
        ) from exc
    if arr.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise RlMtdError(
            f"image {where} is {arr.shape[1]}x{arr.shape[0]}, expected "
            f"{IMAGE_SIZE}x{IMAGE_SIZE}; resize the dataset's images to {IMAGE_SIZE}x{IMAGE_SIZE}"
        )
    return arr


def _member_place(name: str) -> tuple[str, str, str, str] | None:
    """``(prefix, split, class, name-in-class)`` for an image member of an archive, else None.

    Accepts ``train/cat/1.jpg`` and ``top/train/cat/1.jpg`` (one wrapping folder).
    """
    parts = PurePosixPath(name.replace("\\", "/")).parts
    parts = tuple(p for p in parts if p not in ("", "."))
    if any(_hidden(p) for p in parts) or PurePosixPath(name).suffix.lower() not in _IMAGE_SUFFIXES:
        return None
    prefix = ""
    if len(parts) >= 4 and parts[0] not in _SPLITS and parts[1] in _SPLITS:
        prefix, parts = parts[0], parts[1:]
    if len(parts) < 3 or parts[0] not in _SPLITS:
        return None
    return prefix, parts[0], parts[1], "/".join(parts[2:])


def _archive_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """``(member name, bytes)`` for every regular file of an archive, streamed in file order."""
    lower = path.name.lower()
    if lower.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.is_dir() and _member_place(info.filename) is not None:
                    yield info.filename, zf.read(info)
        return
    mode = next(m for suffix, m in _TAR_MODES.items() if lower.endswith(suffix))
    # Stream mode ("r|..."): one pass over the compressed file, no index, nothing on disk.
    with tarfile.open(path, mode) as tf:
        for member in tf:
            if member.isfile() and _member_place(member.name) is not None:
                handle = tf.extractfile(member)
                assert handle is not None  # regular files always have one
                yield member.name, handle.read()


def _read_archive(path: Path, images: _Images, progress: bool) -> None:
    """Decode every image of an ImageFolder archive into ``images``."""
    prefixes: set[str] = set()
    bar = tqdm(desc=f"decoding {path.name}", unit="img", disable=not progress)
    try:
        for name, data in _archive_members(path):
            prefix, split, cls, rel = _member_place(name)  # type: ignore[misc]
            prefixes.add(prefix)
            if len(prefixes) > 1:
                raise RlMtdError(
                    f"archive {path} holds train/ and test/ under several top-level folders "
                    f"({', '.join(sorted(p or '.' for p in prefixes))}); keep one"
                )
            images.add(split, cls, rel, data, f"{name!r} in archive {path}")
            bar.update()
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as exc:
        raise RlMtdError(
            f"archive {path} is corrupt or truncated ({exc}); download or rebuild it, or {_FIX}"
        ) from exc
    finally:
        bar.close()


def _folder_files(root: Path) -> list[tuple[str, str, str, Path]]:
    """``(split, class, name-in-class, path)`` for every image file of an ImageFolder tree."""
    found = []
    for split in _SPLITS:
        for class_dir in sorted((root / split).iterdir()):
            if not class_dir.is_dir() or _hidden(class_dir.name):
                continue
            for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
                for fname in sorted(filenames):
                    file = Path(dirpath) / fname
                    if not _hidden(fname) and file.suffix.lower() in _IMAGE_SUFFIXES:
                        rel = file.relative_to(class_dir).as_posix()
                        found.append((split, class_dir.name, rel, file))
    return found


def _read_folder(root: Path, images: _Images, progress: bool) -> None:
    """Decode every image of an ImageFolder directory into ``images``."""
    files = _folder_files(root)
    for split, cls, rel, file in tqdm(files, desc=f"decoding {root.name}", unit="img",
                                      disable=not progress):  # fmt: skip
        images.add(split, cls, rel, file.read_bytes(), str(file))


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


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
    for split in _SPLITS:
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


# --------------------------------------------------------------------------------------------
# torchvision and synthetic sources
# --------------------------------------------------------------------------------------------


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
        raise RlMtdError(f"{problem}; {_FIX}") from exc
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


def _synthetic(n_train: int, n_test: int) -> Cifar:
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


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


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
    digest = hashlib.sha256(f"rl_mtd.data:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class DeviceLoader:
    """Batches ``(normalised float32 images, int64 labels)`` drawn from a split on its device.

    Shuffling and augmentation use a ``torch.Generator`` on the split's device, seeded from
    ``seed`` and the epoch number: each pass differs, and a rerun repeats every pass exactly.
    The epoch counter advances each time iteration starts; :meth:`set_epoch` sets it (resume).
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

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration draw epoch ``epoch``'s order and augmentations."""
        self.epoch = int(epoch)

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
