"""What a run directory holds: the files --overwrite clears, and the checks that come before a
run writes into an existing directory (--resume of a finished run, a replayed file about to be
cleared), with the policy.json a resumable run gets back."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from agents.config import RunConfig
from agents.final_check import FINAL_CHECK_FILE
from agents.finetune import FINETUNE_STATE
from agents.run_lock import LOCK_FILE
from agents.search_state import search_finished, what_is_left
from rl_mtd.data.synthetic import is_synthetic
from rl_mtd.errors import RlMtdError
from rl_mtd.io import write_json_atomic
from rl_mtd.policy import Policy

log = logging.getLogger("rl_mtd")

STALE_SEARCH_FILES = (
    "tb",
    "episodes.jsonl",
    "search_state.json",
    "agent.zip",
    "reward_curve.png",
    FINETUNE_STATE,
    FINAL_CHECK_FILE,
)
"""What --overwrite clears before a new run: files a replay would not rewrite, and the
fine-tune state, whose job is gone."""
STALE_OUTPUTS = (
    "policy.json",
    "report.json",
    "report.md",
    "layers.png",
    "compressed.pt",
    "model.onnx",
    "model.torchscript.pt",
)
"""Also cleared by --overwrite, so no earlier run's result stands beside an unfinished one."""
RUN_CONFIG_KEYS = ("net", "width")
"""Keys every run's config.json has held, whatever its version."""


def holds_run(directory: Path) -> bool:
    """Whether ``directory`` holds a run_agent.py run: a config.json with the keys every run's
    has (``RUN_CONFIG_KEYS``)."""
    try:
        data = json.loads((directory / "config.json").read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(key in data for key in RUN_CONFIG_KEYS)


def check_new_out(out: Path, overwrite: bool) -> None:
    """A new run's --out: a new or empty directory, or (``overwrite``) one that holds a run, whose
    files are cleared by name (``clear_earlier_run``). A folder of the user's is written into
    only where no file of the names a run writes is there: a report.md or tb/ of the user's is
    refused rather than cleared."""
    if not out.exists():
        return
    if not out.is_dir():
        raise RlMtdError(f"--out {out} is a file; --out names a run directory")
    # made beforehand, or holding only the lock of a job starting there: nothing to lose
    if not any(p.name != LOCK_FILE for p in out.iterdir()):
        return
    run = holds_run(out)
    if not overwrite:
        resume = f"--resume {out} to go on with an unfinished run there, " if run else ""
        raise RlMtdError(
            f"output directory {out} already exists; pass another --out, {resume}"
            "or --overwrite to write a new run into it (clearing an old run's search "
            "and report there)"
        )
    clash = sorted(
        name
        for name in ("config.json", *STALE_SEARCH_FILES, *STALE_OUTPUTS)
        if (out / name).exists()
    )
    if not run and clash:
        raise RlMtdError(
            f"--overwrite {out}: that directory holds no run_agent.py run (no run's "
            f"config.json), yet --overwrite would clear or replace {', '.join(clash)} there, "
            "which may be yours; pass another --out, or a new or empty directory"
        )


def clear_earlier_run(run_dir: Path) -> None:
    """--overwrite: remove every file an earlier run wrote there (config.json is rewritten);
    files of the user's stay."""
    for stale in (*STALE_SEARCH_FILES, *STALE_OUTPUTS):
        target = run_dir / stale
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def write_run_config(run_dir: Path, cfg: RunConfig, device: Any, baseline_path: str) -> None:
    """The run's config.json: its settings as --resume reads them back."""
    write_json_atomic(
        run_dir / "config.json",
        {
            **cfg.to_dict(),
            # absolute, so that --resume from another directory finds them
            "data": _absolute(data_path(cfg.data)) or cfg.data,
            **{k: _absolute(getattr(cfg, k)) for k in ("checkpoint", "replay")},
            # resolved, so that --resume measures this study whatever the default becomes
            "study_repair_steps": cfg.study_steps if cfg.measures_study else None,
            "out": str(run_dir),
            "resolved_device": str(device),
            "baseline_path": baseline_path,
        },
    )


def data_path(data: Any) -> str | None:
    """The path in a --data setting; None for none, ``cifar10`` (torchvision's download) and
    ``synthetic:...``."""
    if not isinstance(data, str) or data.strip().lower() == "cifar10" or is_synthetic(data):
        return None
    return data


def _absolute(path: str | None) -> str | None:
    """An existing file or folder's absolute path; anything else (None, ``synthetic:...``,
    ``cifar10``) as given."""
    return os.path.abspath(path) if path and os.path.exists(path) else path


def check_resumable(cfg: RunConfig, run_dir: Path, state: dict[str, Any]) -> None:
    """``--resume`` of a run with nothing left to do is refused rather than redone: its search
    (if any, saved as ``state``) finished, no fine-tune waits, and its report.json is of that
    search. So is one whose config.json no longer names the network its search was of."""
    done = len(state.get("episodes", []))
    if cfg.search_more and cfg.timesteps is None and cfg.episodes < done:
        raise RlMtdError(
            f"--resume {run_dir} --episodes {cfg.episodes}: --episodes is the search's total, "
            f"and this run has done {done} already; pass --episodes above {done} to search "
            "longer, or leave it out to go on with what was interrupted"
        )
    best = (state.get("best") or {}).get("policy") or {}
    if best and (best.get("net"), best.get("width")) != (cfg.net, cfg.width):
        raise RlMtdError(
            f"--resume {run_dir}: config.json names {cfg.net} width {cfg.width:g}, but the "
            f"run searched {best.get('net')} width {best.get('width')}; config.json was edited: "
            "put it back, or start a new run with --out NEW_DIR"
        )
    agent = run_dir / "agent.zip"
    if cfg.replay is None and agent.exists() and not search_finished(cfg, state):
        from agents.ppo import read_agent_meta  # stable-baselines3: only where needed

        try:  # before the data and the baseline: the search would load it first thing
            read_agent_meta(agent)
        except RlMtdError:
            raise RlMtdError(
                f"--resume {run_dir}: {agent} is damaged or not an rl_mtd agent, so the search "
                f"cannot be resumed; {what_is_left(run_dir)}"
            ) from None
    _check_not_complete(cfg, run_dir, state, done)


def _check_not_complete(cfg: RunConfig, run_dir: Path, state: dict[str, Any], done: int) -> None:
    """Refuse a run whose report.json is of its whole job: nothing interrupted is left."""
    report_path = run_dir / "report.json"
    if not report_path.exists() or (run_dir / FINETUNE_STATE).exists():
        return
    if cfg.replay is None:
        if not search_finished(cfg, state):
            return
        try:
            reported = json.loads(report_path.read_text()).get("episodes")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return  # a damaged report: the resumed run writes a new one
        if reported != done:
            return  # the report is of an earlier, shorter search
    more = f"pass --episodes above {done} to search longer, or " if cfg.replay is None else ""
    raise RlMtdError(
        f"--resume {run_dir}: that run is complete (report.json is written and nothing was "
        f"interrupted); {more}replay its policy.json with --out NEW_DIR to fine-tune it again"
    )


def restore_policy(run_dir: Path, state: dict[str, Any]) -> None:
    """Write policy.json again from the saved search's best where it is missing or damaged: the
    search writes it only at a new best, so a resumed run would otherwise end without it (a
    final check rewrites it later with the candidate it chooses)."""
    best, path = state.get("best"), run_dir / "policy.json"
    if not best:
        return
    try:
        Policy.load(path)
        return
    except RlMtdError:
        lost = "missing" if not path.exists() else "damaged"
    policy = best["policy"]
    if best.get("strategy") == "sensitivity":  # the warm start's, marked as search() wrote it
        policy = {**policy, "meta": {**policy.get("meta", {}), "warm_start": True}}
    write_json_atomic(path, policy)
    log.warning("%s was %s; written again from the search's best policy, as saved", path, lost)


def check_not_cleared(path: Path, run_dir: Path) -> None:
    """--overwrite clears the old search's files first; the replayed file must not be one."""
    cleared = (*STALE_SEARCH_FILES, *STALE_OUTPUTS)
    if path.resolve() in {(run_dir / name).resolve() for name in cleared}:
        raise RlMtdError(
            f"--replay {path} is a file of --out {run_dir}, which --overwrite clears before the "
            "replay reads it; copy it elsewhere first or pass another --out"
        )
