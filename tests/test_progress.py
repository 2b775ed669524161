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
            self.n, self.total, self.closed, self.postfix = 0, kwargs["total"], False, {}
            made.append(self)

        def update(self, k):
            self.n += k

        def set_postfix(self, **kwargs):
            self.postfix = kwargs

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
        assert made[0].postfix["best_ratio"] == "8.0x"
    assert made[0].closed
