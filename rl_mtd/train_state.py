"""What lets an interrupted ``rl_mtd.train.train`` go on where it stopped: its state file
(written atomically), read back only for the very job that wrote it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from rl_mtd.io import torch_save_atomic

log = logging.getLogger("rl_mtd.train")


def save_state(state: dict, path: Path, desc: str) -> Path | None:
    """Save ``state``; ``path`` again, or None (no more saves) when the save failed."""
    try:
        torch_save_atomic(state, path)
    except OSError as exc:  # a full disk must not end hours of training
        log.warning(
            "%s: cannot save its state to %s (%s); going on without saving", desc, path, exc
        )
        return None
    return path


def saved_progress(path: str | Path) -> float | None:
    """The share of its steps an interrupted ``rl_mtd.train.train`` had done, from its state file;
    None where there is none (or it cannot be read)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return min(1.0, state["step"] / state["total"])
    except Exception:  # no file, or one the run will ignore and start over from
        return None


def load_state(path: Path, key: str, config: dict, total: int, desc: str) -> dict | None:
    """The state an interrupted ``rl_mtd.train.train`` left at ``path`` if it is this very job's."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        same = (
            state.get("format") == 1
            and state.get("key") == key
            and state.get("config") == config
            and state.get("total") == total
        )
    except Exception as exc:  # a damaged file costs the progress it held, nothing else
        log.warning("%s: ignoring %s, which cannot be read (%s); starting over", desc, path, exc)
        return None
    if not same:
        log.warning("%s: %s was saved by another job; starting over", desc, path)
        return None
    return state
