"""Checks a run makes before any work: that its budget is within reach and that it can write
where it must, each failing with one line that names the option to change."""

from __future__ import annotations

from pathlib import Path

import torch

from agents.config import RunConfig
from agents.inputs import latency_model
from agents.replay import BUDGET_KEYS
from agents.search import env_config
from rl_mtd.budget import Budget, BudgetMeter
from rl_mtd.budget_table import BudgetTable
from rl_mtd.decompose import METHODS
from rl_mtd.errors import FULL_DISK, RlMtdError
from rl_mtd.io import check_writable
from rl_mtd.models import build_vgg
from rl_mtd.policy import Policy

STRONGEST_LEVEL = 1e9
"""A per-layer reduction no layer reaches: every method at rank 1, the most any decomposition
compresses (the reach a replay's budget is checked against)."""


def check_writable_as(directory: Path, what: str, fix: str) -> None:
    """A place the run must write that it cannot (read-only, under a file, no permission) is
    the user's to fix before any work: one line naming the option, exit status 2. A disk that
    fills up later stays an OSError (status 1)."""
    try:
        check_writable(directory)
    except OSError as exc:
        if exc.errno in FULL_DISK:
            raise
        same = exc.filename and Path(exc.filename).absolute() == Path(directory).absolute()
        at = f" at {exc.filename}" if exc.filename and not same else ""
        raise RlMtdError(
            f"{what} {directory} cannot be written: {exc.strerror or exc}{at}; {fix}"
        ) from None


def check_reachable(cfg: RunConfig, device: torch.device, policy: Policy | None = None) -> None:
    """Raise if the targets are beyond these methods and levels on this network: parameters and
    MACs from the architecture, a speed-up from its layers timed on ``device`` (cached, so the
    search reuses them), all before the baseline is trained.

    A replayed ``policy`` applies its own ranks, so --levels and --methods play no part: a
    budget it meets is within reach, and one it does not meet is refused only where no
    decomposition of the network reaches it (else the run goes on, and its report says the
    policy falls short)."""
    lm = latency_model(cfg, device)
    budget = Budget(cfg.target_ratio, cfg.target_macs, cfg.target_latency, lm)
    model = build_vgg(cfg.net, width=cfg.width)
    if policy is None:
        env = env_config(cfg)
        BudgetTable(model, env.methods, env.levels).check_target(budget)
        return
    if not any(getattr(cfg, k) for k in BUDGET_KEYS) or BudgetMeter(model, budget).meets(
        policy.choices()
    ):
        return
    # rank 1 everywhere: the strongest option each method has
    BudgetTable(model, METHODS, (float(STRONGEST_LEVEL),)).check_target(
        budget, fixable_by_levels=False
    )
