"""Resuming a run: its saved settings (``config.json``) with what ``--resume`` may change."""

from __future__ import annotations

import json
from pathlib import Path

from agents.config import RunConfig, _at_least
from agents.run_dir import RUN_CONFIG_KEYS, data_path
from rl_mtd.errors import RlMtdError


def resume_config(
    run_dir: str | Path,
    *,
    argv: list[str],
    episodes: int | None = None,
    timesteps: int | None = None,
    progress: bool = True,
    on_interrupt: str = "ask",
    dry_run: bool = False,
) -> RunConfig:
    """The saved run's settings; ``episodes`` (a total) or ``timesteps`` lengthen the search."""
    run_dir = Path(run_dir)
    saved = run_dir / "config.json"
    if run_dir.is_file():
        raise RlMtdError(f"--resume {run_dir} is a file; give a run's directory (its --out)")
    if not run_dir.is_dir():
        raise RlMtdError(f"--resume {run_dir}: no such directory (give a run directory, --out)")
    if not saved.exists():
        raise RlMtdError(f"--resume {run_dir}: no config.json there; is it a run directory?")
    try:
        data = json.loads(saved.read_text(encoding="utf-8-sig"))  # a hand edit may add a BOM
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RlMtdError(f"--resume {run_dir}: config.json is damaged ({exc})") from None
    # Every field has a default: a foreign JSON file would otherwise resume as a default run.
    missing = [key for key in RUN_CONFIG_KEYS if not isinstance(data, dict) or key not in data]
    if missing:
        raise RlMtdError(
            f"--resume {run_dir}: {saved} is not a run_agent.py run config (it lacks "
            f"{', '.join(missing)}, which every run's config.json has); give the --out "
            "directory of a run"
        )
    try:
        cfg = RunConfig.from_dict(data)
    except TypeError as exc:  # methods or levels not a list
        raise RlMtdError(f"--resume {run_dir}: config.json is damaged ({exc})") from None
    cfg.resume, cfg.out, cfg.argv = str(run_dir), str(run_dir), argv
    _check_named_files(run_dir, cfg)
    for flag, value in (("--episodes", episodes), ("--timesteps", timesteps)):
        if value is not None:
            try:
                _at_least(flag, value, 1)
            except RlMtdError as exc:  # the command line's, not config.json's
                raise RlMtdError(
                    f"--resume {run_dir} {flag} {value}: {exc} (the search's total, what is done "
                    "included)"
                ) from None
    cfg.search_more = episodes is not None or timesteps is not None
    if episodes is not None:
        cfg.episodes, cfg.timesteps = episodes, None
    if timesteps is not None:
        cfg.timesteps = timesteps
    cfg.progress, cfg.on_interrupt, cfg.dry_run = progress, on_interrupt, dry_run
    try:
        cfg.validate()
    except RlMtdError as exc:  # a hand edit: say where the setting came from
        raise RlMtdError(
            f"--resume {run_dir}: {saved} holds a setting run_agent.py refuses: {exc} (a flag "
            "named here is the key of config.json with '_' for '-', --finetune-lr as "
            "finetune_lr); undo the edit"
        ) from None
    if cfg.study_repair_steps is None and cfg.measures_study:
        # A run started before STUDY_REPAIR_STEPS became the default (today's runs record the
        # resolved steps in config.json) goes on with the study it began with.
        cfg.study_repair_steps = _recorded_study_steps(run_dir / "agent.zip", cfg)
    return cfg


def _check_named_files(run_dir: Path, cfg: RunConfig) -> None:
    """The files config.json names are still there: else say so, and not that it was edited
    (runs before absolute paths were recorded name them relative to where they started)."""
    for flag, value in (
        ("--data", data_path(cfg.data)),
        ("--checkpoint", cfg.checkpoint),
        ("--replay", cfg.replay),
    ):
        if not isinstance(value, str) or Path(value).expanduser().exists():
            continue  # a value of another type: the config's check below names it
        relative = (
            ""
            if Path(value).expanduser().is_absolute()
            else f", read from {Path.cwd()} (a relative path): run --resume from the directory "
            "the run was started in, or"
        )
        raise RlMtdError(
            f"--resume {run_dir}: the run's {flag} {value} (recorded in its config.json) does "
            f"not exist{relative or ':'} put it back where it was; the run's other files are "
            "kept"
        )


def _recorded_study_steps(agent_path: Path, cfg: RunConfig) -> int:
    """The repair steps of the study a saved agent learned from: those its agent.zip records,
    else (older agents, or none saved yet) the search's own, the default of those runs."""
    if agent_path.exists():
        from agents.ppo import read_agent_meta  # stable-baselines3: only when resuming an agent

        steps = read_agent_meta(agent_path).get("study_repair_steps")
        if steps is not None:
            return steps
    return cfg.repair_steps
