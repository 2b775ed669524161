"""Progress bars for the command line, fed by the library's callbacks (the library draws none)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

from tqdm.auto import tqdm

from agents.config import RunConfig
from rl_mtd.train import TrainProgress


def bars_wanted(enabled: bool) -> bool:
    """Bars only when asked for and on a terminal: CI logs and pipes get none."""
    return enabled and sys.stderr is not None and sys.stderr.isatty()


@contextlib.contextmanager
def train_bar(desc: str, enabled: bool) -> Iterator[Callable[[TrainProgress], None] | None]:
    """A ``train(on_progress=...)`` callback drawing a step bar, or None when bars are off."""
    if not bars_wanted(enabled):
        yield None
        return
    bar = tqdm(desc=desc, leave=False, unit="step")

    def update(p: TrainProgress) -> None:
        if bar.total != p.total:
            bar.total = p.total
        bar.update(p.step - bar.n)
        if p.loss is not None:
            post = {"loss": f"{p.loss:.3f}"}
            if p.val_acc is not None:
                post["acc"] = f"{p.val_acc:.3f}"
            bar.set_postfix(post)

    try:
        yield update
    finally:
        bar.close()


@contextlib.contextmanager
def count_bar(desc: str, unit: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """An ``on_progress(done, total)`` callback drawing a bar (the sensitivity study's), or None
    when bars are off."""
    if not bars_wanted(enabled):
        yield None
        return
    bar = tqdm(desc=desc, leave=False, unit=unit)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


@contextlib.contextmanager
def search_bar(cfg: RunConfig, enabled: bool) -> Iterator[Callable[[dict, dict], None] | None]:
    """A ``search(on_episode=...)`` callback: episodes done / total, best reward and ratio,
    proxy accuracy, episodes per minute and an ETA; None when bars are off."""
    if not bars_wanted(enabled) or cfg.replay is not None:
        yield None
        return
    total = None if cfg.timesteps else cfg.episodes
    bars: list[tqdm] = []  # drawn at the first episode, below the plan and the baseline's lines
    first: list[float] = []  # (episode, time) of this invocation's first finished episode

    def update(entry: dict, best: dict) -> None:
        now = time.perf_counter()
        if not bars:
            bars.append(tqdm(desc="search", total=total, unit="episode", leave=False))
        bar = bars[0]
        if not first:  # resumed episodes count as done, not as this invocation's speed
            first.extend([entry["episode"], now])
            bar.n = entry["episode"] - 1
        if total is not None and entry["episode"] > bar.total:
            bar.total = entry["episode"]
        bar.update(entry["episode"] - bar.n)
        since = entry["episode"] - first[0]
        per_min = 60 * since / (now - first[1]) if since else float("nan")
        bar.set_postfix(
            best_reward=f"{best['reward']:.4f}",
            best_ratio=f"{best['ratio']:.1f}x",
            proxy_acc=f"{entry['accuracy']:.3f}",
            ep_per_min=f"{per_min:.1f}",
        )

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()
