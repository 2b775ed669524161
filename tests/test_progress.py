"""The command line's progress bars."""

from __future__ import annotations

import io
import re
from functools import partial

import agents.progress as progress
from agents.config import RunConfig


def test_the_search_bar_is_drawn_at_the_first_episode_not_before(monkeypatch):
    """Drawn when the context opens, the bar stood above the plan and the baseline's lines,
    which were logged after it; it now appears with the first episode and counts from there."""
    made = []

    class FakeBar:
        def __init__(self, **kwargs):
            self.n, self.total, self.closed = kwargs.get("initial", 0), kwargs["total"], False
            self.postfix = ""
            made.append(self)

        def update(self, k):
            self.n += k

        def set_postfix_str(self, text, refresh=True):
            self.postfix = text

        def close(self):
            self.closed = True

    monkeypatch.setattr(progress, "bars_wanted", lambda enabled: enabled)
    monkeypatch.setattr(progress, "tqdm", FakeBar)
    with progress.search_bar(RunConfig(episodes=10), enabled=True) as update:
        assert made == [], "nothing drawn before the first episode"
        best = {"reward": 0.5, "ratio": 8.0}
        update({"episode": 4, "accuracy": 0.7}, best)  # a resumed search: 3 done before
        update({"episode": 5, "accuracy": 0.6}, best)
        assert len(made) == 1 and made[0].n == 5 and made[0].total == 10
        assert "best 8.0x" in made[0].postfix
    assert made[0].closed


def _last_line(monkeypatch, cfg: RunConfig, episodes: list[int]) -> str:
    """What an 80-column terminal shows after these episodes (tqdm's own redraw interval)."""
    buf = io.StringIO()
    monkeypatch.setattr(progress, "bars_wanted", lambda enabled: enabled)
    monkeypatch.setattr(progress, "tqdm", partial(progress.tqdm, file=buf, ncols=80))
    with progress.search_bar(cfg, enabled=True) as update:
        for ep in episodes:
            update({"episode": ep, "accuracy": 0.154}, {"reward": -0.2320, "ratio": 32.4})
        return re.split(r"[\r\n]", buf.getvalue().rstrip())[-1]


def test_the_search_bar_keeps_its_bar_and_numbers_on_an_80_column_terminal(monkeypatch):
    """A long postfix squeezed the bar to one character and cut off the accuracy; and a
    resumed search's bar showed 0/60 until a second episode ended."""
    last = _last_line(monkeypatch, RunConfig(episodes=60), [31])
    assert len(last) <= 80 and " 31/60 " in last, last
    assert "best 32.4x" in last and "acc 15.4%" in last, last
    bar = re.search(r"\|(.*)\|", last)
    assert bar and len(bar.group(1)) >= 5, f"the bar itself is squeezed: {last!r}"


def test_a_search_of_timesteps_shows_no_bar_or_time_left(monkeypatch):
    """With --timesteps the number of episodes is unknown: no empty bar, no '00:00' left."""
    last = _last_line(monkeypatch, RunConfig(episodes=60, timesteps=500), [1, 2])
    assert last.startswith("search: ") and "episodes [" in last and "acc 15.4%" in last, last
    assert "|" not in last and "<" not in last, last
