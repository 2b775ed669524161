"""The command line's progress bars."""

from __future__ import annotations

import agents.progress as progress
from agents.config import RunConfig


def test_the_search_bar_is_drawn_at_the_first_episode_not_before(monkeypatch):
    """Drawn when the context opens, the bar stood above the plan and the baseline's lines,
    which were logged after it; it now appears with the first episode and counts from there."""
    made = []

    class FakeBar:
        def __init__(self, **kwargs):
            self.n, self.total, self.closed, self.postfix = 0, kwargs["total"], False, ""
            self.last_print_n = 0
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


def test_the_search_bar_keeps_its_bar_and_numbers_on_an_80_column_terminal(monkeypatch):
    """A long postfix squeezed the bar to one character and cut off the accuracy."""
    import io
    import re
    from functools import partial

    buf = io.StringIO()
    monkeypatch.setattr(progress, "bars_wanted", lambda enabled: enabled)
    monkeypatch.setattr(progress, "tqdm", partial(progress.tqdm, file=buf, ncols=80, mininterval=0))
    with progress.search_bar(RunConfig(episodes=60), enabled=True) as update:
        best = {"reward": -0.2320, "ratio": 32.4}
        for ep in range(1, 9):
            update({"episode": ep, "accuracy": 0.154}, best)
        last = re.split(r"[\r\n]", buf.getvalue().rstrip())[-1]
    assert len(last) <= 80 and " 8/60 " in last, last
    assert "best 32.4x" in last and "acc 15.4%" in last, last
    bar = re.search(r"\|(.*)\|", last)
    assert bar and len(bar.group(1)) >= 5, f"the bar itself is squeezed: {last!r}"
