"""A run directory's saved search: what ``--resume`` reads back (``search_state.json``), whether
that search has anything left to do, and the result a search returns."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.config import RunConfig
from agents.final_check import Candidate
from rl_mtd.errors import RlMtdError
from rl_mtd.policy import Policy

log = logging.getLogger("rl_mtd")


@dataclass
class SearchResult:
    policy: Policy
    """The best policy found (by reward)."""
    episodes: list[dict[str, Any]]
    """Every episode of this run directory, earlier invocations included."""
    seconds: float
    """Search time of every invocation together."""
    interrupted: bool = False
    invocations: list[dict[str, Any]] = field(default_factory=list)
    best_reward: float | None = None
    """The best policy's reward (a warm start's policy has one without an episode)."""

    @property
    def warm_start(self) -> Candidate | None:
        """The policy the search started from, scored by its reward (``--warm-start
        sensitivity``; kept in the invocation that ran it), or None."""
        for invocation in self.invocations:
            start = invocation.get("warm_start") or {}
            if isinstance(start.get("policy"), dict):
                return Candidate(Policy.from_dict(start["policy"]), start.get("reward"))
        return None


def what_is_left(run_dir: Path) -> str:
    """The way on from a run whose search state cannot be read."""
    policy = run_dir / "policy.json"
    kept = (
        f"its best policy so far is kept in {policy} (--replay it with --out NEW_DIR to "
        "fine-tune it), or "
        if policy.is_file()
        else ""
    )
    return f"{kept}start the search again with --out NEW_DIR"


def read_search_state(run_dir: Path) -> dict[str, Any]:
    """The search state ``--resume`` goes on from, ``{}`` where none was saved before the first
    episode; a damaged one, or one lost after episodes were recorded, raises."""
    path = run_dir / "search_state.json"
    if not path.exists():
        episodes = run_dir / "episodes.jsonl"
        recorded = episodes.is_file() and any(episodes.read_bytes().split())
        if recorded:  # going on would start the search over, its episodes added twice
            raise RlMtdError(
                f"{path} is missing, but {episodes} records episodes, so the search cannot be "
                f"resumed; {what_is_left(run_dir)}"
            )
        return {}
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RlMtdError(
            f"{path} is damaged ({exc}), so the search cannot be resumed; {what_is_left(run_dir)}"
        ) from None
    if not _is_search_state(state):
        raise RlMtdError(
            f"{path} is not a search state written by run_agent.py; {what_is_left(run_dir)}"
        )
    return state


def _is_search_state(state: Any) -> bool:
    """Whether ``state`` has the types ``search()`` saves, so that a hand-edited one is refused
    rather than crashing the resumed run wherever it is read."""
    if not isinstance(state, dict):
        return False
    lists = state.get("episodes", []), state.get("invocations", [])
    if not all(isinstance(v, list) and all(isinstance(e, dict) for e in v) for v in lists):
        return False
    if not _is_number(state.get("seconds", 0.0)):
        return False
    best = state.get("best")
    if best is None:  # saved before the first episode ended
        return True
    if not isinstance(best, dict) or not _is_number(best.get("reward")):
        return False
    try:
        Policy.from_dict(best.get("policy"))
    except RlMtdError:
        return False
    return True


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def search_finished(cfg: RunConfig, state: dict[str, Any]) -> bool:
    """Whether a resumed run's saved search has nothing left to do: it ended without Ctrl-C
    and ``--resume`` asked for no longer search (``--episodes`` above the episodes done, or
    ``--timesteps``)."""
    done = len(state.get("episodes", []))
    if not done or not state.get("best"):
        return False
    if cfg.search_more and (cfg.timesteps or cfg.episodes > done):
        return False
    # States written before the flag existed: finished when every episode asked for was run.
    return bool(state.get("finished", not cfg.timesteps and done >= cfg.episodes))


def finished_search(cfg: RunConfig, state: dict[str, Any]) -> SearchResult | None:
    """A resumed run's search when its saved ``state`` (``read_search_state``) has nothing
    left to do (its fine-tune was interrupted): the best policy and the episodes, nothing
    searched again."""
    if not search_finished(cfg, state):
        return None
    done = len(state["episodes"])
    log.info("the search finished its %d episodes; going on with its best policy", done)
    this = {"argv": list(cfg.argv), "episodes_before": done, "episodes": 0, "proxy_evaluations": 0}
    return SearchResult(
        Policy.from_dict(state["best"]["policy"]),
        state["episodes"],
        float(state.get("seconds", 0.0)),
        invocations=[*state.get("invocations", []), this],
        best_reward=state["best"].get("reward"),
    )
