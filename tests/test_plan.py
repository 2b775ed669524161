"""The plan's time estimate: what a proxy evaluation's repair steps cost."""

from __future__ import annotations

import types

import pytest
from torch import nn

import agents.plan as plan
from rl_mtd.proxy import ProxyConfig


def test_repair_step_time_is_the_difference_of_two_repairs(monkeypatch):
    """Each repair costs a fixed 1.0 s plus 0.25 s a step on a fake clock: the estimate is the
    step's 0.25 s, the fixed cost cancelled, and the proxy's own settings are left alone."""
    clock = types.SimpleNamespace(now=0.0)
    config = ProxyConfig(repair_steps=200)

    class FakeProxy:
        def __init__(self) -> None:
            self.config = config

        def repair(self, model: nn.Module) -> None:
            clock.now += 1.0 + 0.25 * self.config.repair_steps

    monkeypatch.setattr(plan.time, "perf_counter", lambda: clock.now)
    proxy = FakeProxy()
    assert plan._repair_step_seconds(proxy, nn.Linear(2, 2)) == pytest.approx(0.25)
    assert proxy.config is config
