"""Progress bars for the command line, fed by the library's callbacks (the library draws none)."""

from __future__ import annotations

import contextlib
import sys
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
    """A ``search(on_episode=...)`` callback: episodes done / total and an ETA (tqdm's own), then
    the best policy's ratio and reward and this episode's proxy accuracy, short enough that an
    80-column terminal keeps the bar; None when bars are off."""
    if not bars_wanted(enabled) or cfg.replay is not None:
        yield None
        return
    total = None if cfg.timesteps else cfg.episodes
    bars: list[tqdm] = []  # drawn at the first episode, below the plan and the baseline's lines

    def update(entry: dict, best: dict) -> None:
        text = (
            f"best {best['ratio']:.1f}x, reward {best['reward']:.3f}, acc {entry['accuracy']:.1%}"
        )
        if not bars:  # drawn at once at this episode (a resumed search's count included)
            # no rate column (the ETA says it): room for the bar and the numbers in 80 columns
            fmt = (
                "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"
                if total is not None
                else "{desc}: {n_fmt} episodes [{elapsed}{postfix}]"  # --timesteps: no end known
            )
            bars.append(
                tqdm(
                    desc="search",
                    total=max(total, entry["episode"]) if total is not None else None,
                    initial=entry["episode"],
                    leave=False,
                    bar_format=fmt,
                )
            )
            bars[0].set_postfix_str(text)  # refreshes: the bar shows this episode now
            return
        bar = bars[0]
        if total is not None and entry["episode"] > bar.total:
            bar.total = entry["episode"]
        bar.set_postfix_str(text, refresh=False)
        bar.update(entry["episode"] - bar.n)

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()
