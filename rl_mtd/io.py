"""Filesystem helpers: the cache directory and atomic writes (temp file, then rename)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

CACHE_ENV = "RL_MTD_CACHE"
DATA_ENV = "RL_MTD_DATA"


def cache_dir() -> Path:
    """The cache root: ``$RL_MTD_CACHE``, else ``$XDG_CACHE_HOME/rl_mtd``, else ``~/.cache/rl_mtd``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "rl_mtd"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the body succeeds.

    A crash, Ctrl-C or full disk mid-write leaves the old file untouched, and readers in other
    processes never see a half-written file (``os.replace`` is atomic on one filesystem). An
    ``OSError`` (a full disk, a read-only directory) is raised again naming ``path``, not the
    temporary file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _naming(exc, path) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        # mkstemp's 0600 would make every result private: the mode the file had, or a new one's.
        try:
            os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else _new_file_mode())
        except OSError:
            pass  # a filesystem without modes (FAT, some network mounts): keep what it gives
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        raise _naming(exc, path) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def check_writable(directory: str | os.PathLike) -> None:
    """Raise the ``OSError`` a write into ``directory`` would meet (read-only, not a directory,
    no permission), before hours of work depend on it. Nothing is left behind: the probe file
    goes, and a directory that does not exist yet is not created (its nearest existing parent
    is probed instead)."""
    path = Path(directory).absolute()
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(probe))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".rl_mtd-write-check.", dir=probe)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    os.close(fd)
    os.unlink(tmp)


def _new_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0666 less the process's umask."""
    try:  # Linux states the umask here; os.umask() can only read it by changing it
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o644


def _naming(exc: OSError, path: Path) -> OSError:
    """The same error, about ``path``."""
    return OSError(exc.errno, f"{exc.strerror or exc} while writing", str(path))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


FULL_DISK_BYTES = 16 << 20
"""Free space below which a failed write is taken for a full disk."""


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically. torch reports a failed write (a full disk) as a
    ``RuntimeError`` from its zip writer; that becomes the ``OSError`` every other write
    raises (``ENOSPC`` when the disk is nearly full), so callers handle one kind of error."""
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as exc:
            try:  # before the partial file goes (its writer may hold its blocks a while yet)
                full = shutil.disk_usage(tmp.parent).free < FULL_DISK_BYTES
            except OSError:
                full = False
            tmp.unlink(missing_ok=True)
            if full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from exc
            raise OSError(errno.EIO, f"torch.save failed ({exc})") from exc
