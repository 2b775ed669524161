"""Replaying a saved result instead of searching: a policy file, or an agent run greedily on
this checkpoint, judged by the budget it was searched under."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agents.config import RunConfig
from agents.final_check import BUDGET_KEYS as RECORDED_BUDGET_KEYS
from agents.inputs import latency_model
from envs.mixed_decomposition import EnvConfig, MixedDecompositionEnv
from rl_mtd.errors import RlMtdError
from rl_mtd.policy import Policy
from rl_mtd.proxy import Proxy
from rl_mtd.settle import settle_of

log = logging.getLogger("rl_mtd")


@dataclass
class Replay:
    """A saved result to apply instead of searching: a policy file or an agent."""

    kind: str  # "policy" or "agent"
    path: Path
    policy: Policy | None = None
    meta: dict[str, Any] | None = None
    agent: Any = None


def load_replay(cfg: RunConfig) -> Replay | None:
    """Read ``--replay`` (a policy.json or an agent.zip) and check it was made for this net."""
    if cfg.replay is None:
        return None
    path = Path(cfg.replay)
    if path.suffix == ".zip":
        from agents.ppo import load_agent, read_agent_meta

        meta = read_agent_meta(path)
        _check_same_net(cfg, meta["net"], meta["width"], f"agent {path}")
        _check_settle_order(path, meta)
        # Loaded now: a damaged agent is refused before --overwrite clears anything.
        return Replay("agent", path, meta=meta, agent=load_agent(path))
    _check_not_weights(path)
    policy = Policy.load(path)
    _check_same_net(cfg, policy.net, policy.width, f"policy {path}")
    return Replay("policy", path, policy=policy)


def check_classes(replay: Replay | None, num_classes: int) -> None:
    """A replayed policy made for another class count (hand-edited, or another dataset's): its
    compressed.pt would not load, so it is refused."""
    if replay is None or replay.policy is None or replay.policy.num_classes == num_classes:
        return
    raise RlMtdError(
        f"policy {replay.path} was made for a net with {replay.policy.num_classes} classes, but "
        f"this run's data has {num_classes}; replay a policy searched on this dataset (its "
        "compressed.pt would not load otherwise)"
    )


def _check_not_weights(path: Path) -> None:
    """A PyTorch file (a zip archive or a legacy pickle) given where a policy.json belongs."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"PK" or head[:1] == b"\x80":
        raise RlMtdError(
            f"--replay {path} is a binary file (it begins as PyTorch files do), not a policy; "
            "--replay takes a run's policy.json "
            "or agent.zip (a compressed.pt is already a result: rl_mtd.policy.load_compressed "
            "rebuilds it; a baseline goes to --checkpoint)"
        )


def _check_settle_order(path: Path, meta: dict) -> None:
    """An order naming layers the net lacks (a hand edit) is refused now, not after the
    replay's episode."""
    from rl_mtd.models import CFGS

    n = sum(isinstance(c, int) for c in CFGS[meta["net"]])
    bad = [i for i in meta.get("settle_first", []) if i >= n]
    if bad:
        raise RlMtdError(
            f"agent file {path}: its metadata's settle_first names layers {bad}, but "
            f"{meta['net']} has {n} conv layers (0..{n - 1}); it was edited or written for "
            "another net, so re-run the search"
        )


def _check_same_net(cfg: RunConfig, net: str, width: float, what: str) -> None:
    if net != cfg.net or float(width) != float(cfg.width):
        raise RlMtdError(
            f"{what} was made for {net} at width {width}, but this run is {cfg.net} at width "
            f"{cfg.width}; pass --net {net} --width {width} with a matching --checkpoint"
        )


BUDGET_KEYS = ("target_ratio", "target_macs", "target_latency")


HOW_MADE = ("strategy", *RECORDED_BUDGET_KEYS, "methods", "levels")
"""What a replay's policy.json keeps of the replayed policy's meta: how it was made. Not what
its run measured or did (reward, proxy scores, episode, warm start, final check) on another
checkpoint; this run's own numbers are in report.json."""


def replayed_policy(replay: Replay) -> Policy:
    """The replayed policy file's policy for this run's policy.json: the budget, strategy,
    methods and levels it was searched with (``HOW_MADE``), and where it came from."""
    policy = replay.policy
    if policy is None:
        raise RlMtdError(f"{replay.path} is an agent, not a policy file")
    meta = {k: policy.meta[k] for k in HOW_MADE if k in policy.meta}
    return replace(policy, meta={**meta, "replayed_from": str(replay.path)})


def _replay_meta(replay: Replay) -> dict[str, Any]:
    return (replay.meta if replay.kind == "agent" else replay.policy.meta) or {}  # type: ignore[union-attr]


def records_budget(replay: Replay) -> bool:
    return any(k in _replay_meta(replay) for k in BUDGET_KEYS)


def with_replayed_budget(cfg: RunConfig, replay: Replay | None) -> RunConfig:
    """A replayed agent or policy is judged by the budget it was searched under, as its meta
    records it: the agent's environment holds it, and the report states it and, for a latency
    budget, predicts the speed-up on this device. A file that records none keeps the run's."""
    if replay is None:
        return cfg
    if not records_budget(replay):
        return cfg
    meta = _replay_meta(replay)
    budget = {k: meta.get(k) for k in BUDGET_KEYS}
    batch = meta.get("latency_batch", cfg.latency_batch)
    try:
        out = replace(cfg, **budget, latency_batch=batch, n_envs=1).validate()
    except RlMtdError as exc:
        raise RlMtdError(f"{replay.path} records a budget this run cannot use: {exc}") from None
    if budget != {k: getattr(cfg, k) for k in BUDGET_KEYS}:
        log.info(
            "replaying %s under the budget it was searched for (%s), not this run's",
            replay.path,
            ", ".join(f"{k} {v:g}" for k, v in budget.items() if v is not None) or "trade-off",
        )
    return out


def replay_agent(cfg: RunConfig, replay: Replay, proxy: Proxy) -> Policy:
    """Run a saved agent deterministically through an env on this checkpoint.

    This is the agent's greedy choice at every layer, which can differ from the best policy
    its search found (that one is the run's policy.json).
    """
    from agents.ppo import load_agent
    from agents.studies import layer_scores

    meta = replay.meta or {}
    first, points = settle_of(meta)  # as the heuristic the agent started from settled
    target_latency = meta.get("target_latency")
    latency = None
    if target_latency is not None:  # the budget holds on this device, timed afresh here
        latency = latency_model(
            replace(cfg, target_latency=target_latency, latency_batch=meta.get("latency_batch", 1)),
            proxy.device,
        )
    env = MixedDecompositionEnv(
        proxy,
        EnvConfig(
            methods=tuple(meta["methods"]),
            levels=tuple(meta["levels"]),
            target_ratio=meta.get("target_ratio"),
            target_macs=meta.get("target_macs"),
            target_latency=target_latency,
            settle_first=first,
            settle_points=points,
        ),
        layer_scores=layer_scores(
            meta.get("observe", "layer"),
            proxy,
            meta.get("study_repair_steps"),
            trained_on=meta.get("study_settings"),
        ),
        latency_model=latency,
    )
    agent = replay.agent if replay.agent is not None else load_agent(replay.path)
    if agent.action_space != env.action_space or agent.observation_space != env.observation_space:
        raise RlMtdError(f"agent {replay.path} does not fit this environment (spaces differ)")
    obs, _ = env.reset(seed=cfg.seed)
    done = False
    while not done:
        action, _ = agent.predict(obs, deterministic=True)
        obs, _, done, _, _ = env.step(int(action))
    log.info(
        "replayed agent %s: its greedy choice at every layer, which can differ from the best "
        "policy its search found (that run's policy.json)",
        replay.path,
    )
    return env.current_policy()
