"""Command line of ``run_agent.py`` and the ``rl-mtd`` console script.

The only place that prompts the user, draws the search's progress bar, or picks an exit code.
The flags themselves and their help: ``agents.cli_args``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from agents.cli_args import build_parser
from agents.config import RunConfig
from rl_mtd.errors import RlMtdError, os_error_message

log = logging.getLogger("rl_mtd")


def config_from_args(args: argparse.Namespace, argv: list[str]) -> RunConfig:
    overrides = {
        "net": args.net,
        "width": args.width,
        "data": args.data,
        "checkpoint": args.checkpoint,
        "out": args.out,
        "overwrite": args.overwrite,
        "dry_run": args.dry_run,
        "device": args.device,
        "seed": args.seed,
        "methods": args.methods,
        "levels": args.levels,
        "episodes": args.episodes,
        "timesteps": args.timesteps,
        "n_envs": args.n_envs,
        "proxy_size": args.proxy_size,
        "bn_batches": args.bn_batches,
        "repair_steps": args.repair_steps,
        "study_repair_steps": args.study_repair_steps,
        "baseline_epochs": args.baseline_epochs,
        "finetune_epochs": args.finetune_epochs,
        "kd": args.kd,
        "feature_kd": args.feature_kd,
        "stages": args.stages,
        "final_check": args.final_check,
        "final_check_epochs": args.final_check_epochs,
        "final_check_margin": args.final_check_margin,
        "fit": args.fit,
        "warm_start": args.warm_start,
        "observe": args.observe,
        "warm_start_prob": args.warm_start_prob,
        "imitate_best": args.imitate_best,
        "export": args.export,
        "train_size": args.train_size,
        "test_size": args.test_size,
        "replay": args.replay,
        "resume": args.resume,
        "on_interrupt": args.on_interrupt,
        "progress": not args.no_progress,
        "argv": argv,
        "target_ratio": args.target_ratio,
        "target_macs": args.target_macs,
        "target_latency": args.target_latency,
        "latency_batch": args.latency_batch,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "finetune_lr": args.finetune_lr,
        "finetune_weight_decay": args.finetune_weight_decay,
        "finetune_label_smoothing": args.finetune_label_smoothing,
        "latency_repeats": args.latency_repeats,
    }
    cfg = RunConfig.with_preset(args.preset, **overrides)
    if args.tradeoff:
        if any(t is not None for t in (args.target_ratio, args.target_macs, args.target_latency)):
            raise RlMtdError(
                "--tradeoff excludes --target-ratio, --target-macs and --target-latency; pass "
                "one or the others"
            )
        cfg.target_ratio = None
    elif args.target_ratio is None and (
        args.target_macs is not None or args.target_latency is not None
    ):
        cfg.target_ratio = None  # a MACs and/or latency budget alone
    if not cfg.has_budget and args.warm_start is None:
        cfg.warm_start = "none"  # the heuristic needs a budget; the preset's choice yields
    if args.final_check is None:  # the preset's check yields too; one typed is validated
        if cfg.replay is not None or not cfg.has_budget:
            cfg.final_check = 0
        elif cfg.timesteps is None:
            cfg.final_check = min(cfg.final_check, cfg.most_candidates)
    return cfg


def _ask_to_go_on(cfg: RunConfig) -> Callable[[Path], bool]:
    def ask(run_dir: Path) -> bool:
        log.warning(
            "search interrupted; the agent and the best policy so far are saved in %s "
            "(continue later with --resume %s)",
            run_dir,
            run_dir,
        )
        if cfg.on_interrupt == "report":
            return True
        if cfg.on_interrupt == "ask" and sys.stdin is not None and sys.stdin.isatty():
            try:
                answer = input("fine-tune and report the best policy so far? [y/N] ")
            except (EOFError, KeyboardInterrupt):
                return False
            return answer.strip().lower() in ("y", "yes")
        return False

    return ask


RESUME_FLAGS = (
    "resume",
    "episodes",
    "timesteps",
    "no_progress",
    "quiet",
    "on_interrupt",
    "dry_run",
)
"""What --resume takes from the command line; everything else comes from the run's config."""


def _typed_dests(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, str]:
    """The flags on the command line by destination, each named in full (``--epi`` and
    ``--episodes=3`` as ``--episodes``; ``--no-imitate-best`` as typed)."""
    out = {}
    for token in argv:
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        matches = {
            action.dest: action.option_strings[0]
            for action in parser._actions
            for option in action.option_strings
            if option == name or (parser.allow_abbrev and option.startswith(name))
        }
        exact = {a.dest: name for a in parser._actions if name in a.option_strings}
        for dest, full in (exact or (matches if len(matches) == 1 else {})).items():
            out.setdefault(dest, full)
    return out


def _check_resume_flags(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]
) -> None:
    """A flag --resume would ignore is an error, not a silent no-op, even when its value is
    the default (``--seed 0``)."""
    typed = _typed_dests(parser, argv)
    ignored = [
        typed.get(dest, "--" + dest.replace("_", "-"))
        for dest, value in vars(args).items()
        if dest not in RESUME_FLAGS and (dest in typed or value != parser.get_default(dest))
    ]
    if ignored:
        parser.error(
            f"--resume continues a run with the settings in its config.json; {', '.join(ignored)} "
            "would be ignored. Drop them, or start a new run (--replay RUN_DIR/policy.json "
            "applies that run's policy with new settings)"
        )


REPLAY_IGNORES = (
    "methods",
    "levels",
    "episodes",
    "timesteps",
    "n_envs",
    "warm_start",
    "observe",
    "warm_start_prob",
    "imitate_best",
    "final_check_epochs",
    "final_check_margin",
)
"""Search settings a --replay never uses (it applies the policy's own ranks, or the agent's
own methods and levels). --final-check and --study-repair-steps are refused by
``RunConfig.validate`` with their reasons; the budget flags stay (a replayed policy that
records no budget is judged by the run's)."""


def _check_replay_flags(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """A search flag typed beside --replay is an error, not a silent no-op."""
    typed = _typed_dests(parser, argv)
    ignored = [typed[dest] for dest in REPLAY_IGNORES if dest in typed]
    if ignored:
        parser.error(
            f"--replay applies a saved policy or agent and searches nothing, so "
            f"{', '.join(ignored)} would be ignored; drop {'them' if len(ignored) > 1 else 'it'}, "
            "or search anew without --replay"
        )


PATH_FLAGS = ("out", "checkpoint", "replay", "resume", "data")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in PATH_FLAGS:  # "--out=~/runs/a" reaches us unexpanded; the run uses one path
        value = getattr(args, flag)
        if isinstance(value, str) and not value.strip():  # not "." by accident
            parser.error(f"--{flag} is empty; pass a path, or leave --{flag} out")
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, flag, os.path.expanduser(value))
    if args.resume is not None:
        _check_resume_flags(parser, args, argv)
    elif args.replay is not None:
        _check_replay_flags(parser, argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet and not args.dry_run else logging.INFO,
        format="%(message)s",
        stream=sys.stdout,
    )
    import torch  # heavy imports after argument errors are reported

    from agents.pipeline import run
    from agents.progress import search_bar
    from agents.resume import resume_config
    from agents.run_lock import RunLock

    try:
        if args.resume is not None:
            cfg = resume_config(
                args.resume,
                argv=argv,
                episodes=args.episodes,
                timesteps=args.timesteps,
                progress=not args.no_progress,
                on_interrupt=args.on_interrupt,
                dry_run=args.dry_run,
            )
        else:
            cfg = config_from_args(args, argv)
        with (
            search_bar(cfg, enabled=not args.no_progress and not args.quiet) as on_episode,
            torch.backends.cudnn.flags(enabled=True, benchmark=True),
            RunLock() as lock,
        ):
            ask = _ask_to_go_on(cfg)
            report = run(cfg, go_on_after_interrupt=ask, on_episode=on_episode, lock=lock)
        if report is None:
            return 130
    except RlMtdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk, a read-only directory
        print(f"error: {os_error_message(exc)}", file=sys.stderr)
        return 1
    return 0
