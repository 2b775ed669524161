"""Decoding an ImageFolder dataset, as a directory or an archive, into uint8 tensors.

The layout is ``train/<class>/<image>`` and ``test/<class>/<image>``, optionally under one
top-level folder. Archives (``.tar.gz``/``.tgz``/``.tar``/``.tar.bz2``/``.tar.xz``/``.zip``)
are streamed, never extracted to disk. Labels are the sorted class folder names of ``train/``.
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from rl_mtd.data.splits import IMAGE_SIZE, Split
from rl_mtd.errors import RlMtdError
from rl_mtd.io import DATA_ENV

SPLITS = ("train", "test")
TAR_MODES = {
    ".tar.gz": "r|gz",
    ".tgz": "r|gz",
    ".tar": "r|",
    ".tar.bz2": "r|bz2",
    ".tar.xz": "r|xz",
}
ARCHIVE_SUFFIXES = (*TAR_MODES, ".zip")
_IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp"}
)
# The end of every error about a missing or malformed source: how to point at good data.
FIX = (
    "pass --data PATH (a torchvision CIFAR-10 folder, an ImageFolder directory, or a "
    f".tar.gz/.zip archive with train/ and test/) or set {DATA_ENV}"
)
LAYOUT = "expected train/<class>/<image> and test/<class>/<image>"


def read_imagefolder(
    path: Path, description: str, *, archive: bool, progress: bool
) -> tuple[Split, Split, tuple[str, ...]]:
    """The train and test images of the directory or archive ``path``, and the class names.

    ``description`` names the source in errors; ``progress`` shows a tqdm bar while decoding.
    """
    images = _Images(description)
    if archive:
        _read_archive(path, images, progress)
    else:
        _read_folder(path, images, progress)
    return images.build()


def is_hidden(name: str) -> bool:
    """Dot-files and macOS zip debris are never images of the dataset."""
    return name.startswith(".") or name == "__MACOSX"


@dataclass
class _Images:
    """Decoded images of one source by split and class, stacked in a fixed order at the end.

    The order (label, then path within the class folder) does not depend on the order of an
    archive's members, so a directory and an archive of the same files give the same tensors.
    """

    origin: str
    found: dict[str, dict[str, list[tuple[str, np.ndarray]]]] = field(
        default_factory=lambda: {s: {} for s in SPLITS}
    )

    def add(self, split: str, cls: str, name: str, data: bytes, where: str) -> None:
        self.found[split].setdefault(cls, []).append((name, _decode_image(data, where)))

    def build(self) -> tuple[Split, Split, tuple[str, ...]]:
        for split in SPLITS:
            if not self.found[split]:
                raise RlMtdError(
                    f"{self.origin} has no images under {split}/<class>/ ({LAYOUT}); add the "
                    f"{split} images, or {FIX}"
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
    if (
        any(is_hidden(p) for p in parts)
        or PurePosixPath(name).suffix.lower() not in _IMAGE_SUFFIXES
    ):
        return None
    prefix = ""
    if len(parts) >= 4 and parts[0] not in SPLITS and parts[1] in SPLITS:
        prefix, parts = parts[0], parts[1:]
    if len(parts) < 3 or parts[0] not in SPLITS:
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
    mode = next(m for suffix, m in TAR_MODES.items() if lower.endswith(suffix))
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
            f"archive {path} is corrupt or truncated ({exc}); download or rebuild it, or {FIX}"
        ) from exc
    finally:
        bar.close()


def _folder_files(root: Path) -> list[tuple[str, str, str, Path]]:
    """``(split, class, name-in-class, path)`` for every image file of an ImageFolder tree."""
    found = []
    for split in SPLITS:
        for class_dir in sorted((root / split).iterdir()):
            if not class_dir.is_dir() or is_hidden(class_dir.name):
                continue
            for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
                for fname in sorted(filenames):
                    file = Path(dirpath) / fname
                    if not is_hidden(fname) and file.suffix.lower() in _IMAGE_SUFFIXES:
                        rel = file.relative_to(class_dir).as_posix()
                        found.append((split, class_dir.name, rel, file))
    return found


def _read_folder(root: Path, images: _Images, progress: bool) -> None:
    """Decode every image of an ImageFolder directory into ``images``."""
    files = _folder_files(root)
    bar = tqdm(files, desc=f"decoding {root.name}", unit="img", disable=not progress)
    for split, cls, rel, file in bar:
        images.add(split, cls, rel, file.read_bytes(), str(file))
