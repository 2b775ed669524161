"""The whole job: data -> baseline -> search (or replay) -> apply -> fine-tune -> test -> report.

Everything that can be wrong with the input is checked (``RunConfig.validate``, ``load_replay``)
before any long work starts and before the run directory is touched.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from agents.config import RunConfig
from agents.final_check import FINAL_CHECK_FILE
from agents.finetune import FINETUNE_STATE, compress_and_finetune, run_final_check
from agents.inputs import (
    baseline_cache_path,
    baseline_state_path,
    get_baseline,
    kept_baseline,
    latency_model,
    load_data,
    note_other_baseline_states,
    warn_about_baseline,
)
from agents.plan import measure, print_plan
from agents.prechecks import check_reachable, check_writable_as
from agents.replay import (
    BUDGET_KEYS,
    check_classes,
    load_replay,
    records_budget,
    replay_agent,
    replayed_policy,
    with_replayed_budget,
)
from agents.report import RunResult, build_report, write_outputs
from agents.run_dir import (
    check_new_out,
    check_not_cleared,
    check_resumable,
    clear_earlier_run,
    restore_policy,
    write_run_config,
)
from agents.run_lock import RunLock
from agents.search import make_proxy, proxy_config, search, worker_evaluations
from agents.search_state import finished_search, read_search_state, search_finished
from agents.speed import write_export
from rl_mtd.budget import Budget, BudgetMeter
from rl_mtd.checkpoints import load_baseline, save_compressed
from rl_mtd.errors import RlMtdError
from rl_mtd.evaluation import evaluate
from rl_mtd.io import CACHE_ENV, write_json_atomic
from rl_mtd.policy import Policy
from rl_mtd.proxy import Proxy, resolve_device
from rl_mtd.train_state import saved_progress

log = logging.getLogger("rl_mtd")


def _predicted_latency(cfg: RunConfig, proxy: Proxy, policy: Policy) -> dict[str, Any] | None:
    """The latency model's prediction for ``policy`` (None without ``--target-latency``)."""
    lm = latency_model(cfg, proxy.device)
    if lm is None:
        return None
    choices = policy.choices()
    lm.save()
    return {
        "batch": lm.batch_size,
        "original_ms": lm.original_ms,
        "compressed_ms": lm.predict(choices),
        "speedup": lm.speedup(choices),
        "model": lm.describe(),
    }


def _budget_meter(cfg: RunConfig, proxy: Proxy) -> BudgetMeter | None:
    """The run's budget as a meter of policies; None in trade-off mode (no budget)."""
    if not any(getattr(cfg, k) for k in BUDGET_KEYS):
        return None
    lm = latency_model(cfg, proxy.device)
    budget = Budget(cfg.target_ratio, cfg.target_macs, cfg.target_latency, lm)
    return BudgetMeter(proxy.model, budget)


def _budget_text(cfg: RunConfig) -> str:
    """The run's budget as its flags: ``--target-ratio 8, --target-macs 4``."""
    return ", ".join(
        f"--{k.replace('_', '-')} {getattr(cfg, k):g}" for k in BUDGET_KEYS if getattr(cfg, k)
    )


def run(
    cfg: RunConfig,
    *,
    go_on_after_interrupt: Callable[[Path], bool] = lambda _: False,
    on_episode: Callable[[dict, dict], None] | None = None,
    lock: RunLock | None = None,
) -> dict[str, Any] | None:
    """Run the whole job; report.json's content, or None when an interrupted search stops it.
    With ``cfg.dry_run``, stop after the plan: ``{"dry_run": True, "estimated_seconds": ...}``.

    ``go_on_after_interrupt(run_dir)`` decides, after Ctrl-C in the search, whether to fine-tune
    and report the best policy so far (the CLI asks the user).
    """
    replay = load_replay(cfg.validate())
    run_dir = (
        Path(cfg.out) if cfg.out else Path("runs") / f"{cfg.net}-{datetime.now():%Y%m%d-%H%M%S}"
    )
    # now, not after the baseline is trained
    if cfg.resume is None:
        check_writable_as(run_dir, "--out", "pick a writable directory for --out")
    else:
        check_writable_as(
            run_dir, "--resume", "make it writable, or copy the run elsewhere and resume the copy"
        )
    if lock is not None and not cfg.dry_run:  # before its state is read or anything written
        lock.take(run_dir, resume=cfg.resume is not None)
        if cfg.resume is None and cfg.out:  # checked before the lock: another job may have ended
            check_new_out(run_dir, cfg.overwrite)
    # A resumed run's search as saved (read once: the checks, the plan and the search use it).
    state = read_search_state(Path(cfg.resume)) if cfg.resume is not None else {}
    if cfg.resume is not None:
        check_resumable(cfg, Path(cfg.resume), state)
        earlier = Path(cfg.resume) / "report.json"
        if earlier.exists():  # the report of a search stopped early and applied as it was
            log.info(
                "%s holds an earlier report of this run; this run replaces it (and "
                "compressed.pt) when it ends: copy them first to keep them",
                earlier,
            )
    if replay is not None and cfg.overwrite and cfg.out:
        check_not_cleared(replay.path, Path(cfg.out))
    device = resolve_device(cfg.device)
    # A checkpoint of another net, a whole pickled model or NaN weights: before any work.
    given = (
        None
        if cfg.checkpoint is None
        else load_baseline(cfg.checkpoint, net=cfg.net, width=cfg.width)[0]
    )
    cfg = with_replayed_budget(cfg, replay)
    if replay is None or replay.kind == "policy":  # a target out of reach: before any work
        try:
            check_reachable(cfg, device, None if replay is None else replay.policy)
        except RlMtdError as exc:
            if replay is None or not records_budget(replay):
                raise
            # The file's budget, hand-edited or from another net.
            raise RlMtdError(f"{replay.path} records a budget this run cannot use: {exc}") from None
    splits, data = load_data(cfg)
    splits = splits.to(device)
    check_classes(replay, data.num_classes)
    need_baseline = (
        cfg.checkpoint is None
        and not baseline_cache_path(cfg, data.key).exists()
        and kept_baseline(cfg, run_dir) is None
    )
    if need_baseline:  # where the trained baseline will be kept
        check_writable_as(
            baseline_cache_path(cfg, data.key).parent,
            "the cache",
            f"point {CACHE_ENV} at a writable directory",
        )
    if device.type == "cpu" and cfg.preset == "paper":
        log.warning(
            "the paper preset is sized for a GPU (at full width, days on a CPU); consider "
            "--preset cpu%s. Timing this CPU for the plan, which estimates this run",
            " and --width 0.25" if cfg.width > 0.25 else "",
        )
    else:
        log.info("timing this device for the plan")
    timing = measure(cfg, splits, device, proxy_config(cfg), search=replay is None)
    search_done = replay is None and cfg.resume is not None and search_finished(cfg, state)
    estimate = print_plan(
        cfg,
        splits,
        device,
        timing,
        need_baseline,
        str(replay.path) if replay else None,
        len(state.get("episodes", [])),
        saved_progress(run_dir / FINETUNE_STATE) if cfg.resume else None,
        search_done,
        saved_progress(baseline_state_path(baseline_cache_path(cfg, data.key)))
        if need_baseline
        else None,
    )
    if need_baseline:
        note_other_baseline_states(cfg, data.key)
    if cfg.dry_run:
        log.info("dry run: stopped before any work; nothing was written to %s", run_dir)
        return {"dry_run": True, "estimated_seconds": estimate}
    if cfg.resume is not None:  # policy.json deleted or damaged since the search's last best
        restore_policy(run_dir, state)
    baseline, baseline_path = get_baseline(cfg, splits, data.key, device, given, run_dir)
    proxy = make_proxy(cfg, baseline, splits, device)

    if cfg.resume is None:
        if run_dir.exists() and cfg.overwrite:
            clear_earlier_run(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(run_dir, cfg, device, baseline_path)

    baseline_acc = evaluate(baseline, splits.test, full_precision=True)
    log.info(
        "baseline: test accuracy %.2f%%, proxy accuracy %.2f%%",
        100 * baseline_acc,
        100 * proxy.baseline_acc,
    )
    warn_about_baseline(baseline_acc, proxy, checkpoint=given is not None)
    episodes: list[dict[str, Any]] = []
    invocations: list[dict[str, Any]] = []
    search_seconds, interrupted = 0.0, False
    if replay is None:
        found = (finished_search(cfg, state) if search_done else None) or search(
            cfg, proxy, run_dir, baseline_path, on_episode=on_episode
        )
        if found.interrupted and not go_on_after_interrupt(run_dir):
            return None
        policy, episodes, invocations = found.policy, found.episodes, found.invocations
        best_reward, warm = found.best_reward, found.warm_start
        search_seconds, interrupted = found.seconds, found.interrupted
    else:
        policy = (
            replayed_policy(replay) if replay.kind == "policy" else replay_agent(cfg, replay, proxy)
        )
        policy.save(run_dir / "policy.json")  # type: ignore[union-attr]
    check = None
    if replay is None and cfg.final_check > 1:
        try:
            check = run_final_check(
                cfg, proxy, policy, episodes, baseline, splits, run_dir, best_reward, warm
            )
        except KeyboardInterrupt:
            log.warning(
                "final check interrupted; %s",
                f"run_agent.py --resume {run_dir} goes on with it (the candidates done are "
                f"kept in {run_dir / FINAL_CHECK_FILE})"
                if not interrupted
                else f"the search's best policy is kept in {run_dir / 'policy.json'}",
            )
            raise
    if check is not None:
        search_seconds += check.seconds
        if check.chosen:  # another policy than the search's best: policy.json becomes it
            policy = check.policy
        # What the search wrote for its best (reward, proxy, warm start) stays when it is kept.
        saved = run_dir / "policy.json"
        kept = json.loads(saved.read_text()) if not check.chosen and saved.exists() else {}
        write_json_atomic(
            run_dir / "policy.json",
            {
                **policy.to_dict(),
                "meta": {
                    **kept.get("meta", {}),
                    **policy.meta,
                    "final_check": {"chosen": check.chosen, "of": len(check.rows)},
                },
            },
        )
    # A search's count leaves out scoring its chosen policy for the report: a memo hit, but a
    # new evaluation after --resume when an earlier invocation found it.
    searched = proxy.evaluations
    proxy_result = proxy.evaluate(policy)  # type: ignore[arg-type]
    log.info(
        "best policy: %.2fx parameters, proxy accuracy %.2f%%",
        proxy_result.compression_ratio,
        100 * proxy_result.accuracy,
    )

    meter = _budget_meter(cfg, proxy)
    budget_met = None if meter is None else meter.meets(policy.choices())  # type: ignore[union-attr]
    if meter is not None and not budget_met:
        why = ""
        if replay is not None:
            why = (
                ": its file was edited, or its layers were timed on another device"
                if records_budget(replay)
                else ": it was searched for another budget, or edited"
            )
        log.warning(
            "the policy (%s) does not meet this run's budget (%s)%s; going on with it as "
            "it is, and the report says so",
            meter.describe(policy.choices()),  # type: ignore[union-attr]
            _budget_text(cfg),
            why,
        )
    try:
        compressed, ft = compress_and_finetune(cfg, proxy, policy, baseline, splits, run_dir)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        # --resume goes on with this fine-tune unless it has a search to finish first.
        # Before its first save too: a resumed run whose search finished only fine-tunes.
        if replay is not None or not interrupted:
            saved = (run_dir / FINETUNE_STATE).exists()
            log.warning(
                "fine-tune interrupted; run_agent.py --resume %s %s, without searching again",
                run_dir,
                f"goes on from its last save ({run_dir / FINETUNE_STATE})"
                if saved
                else "fine-tunes the policy again (it stopped before its first save)",
            )
        else:
            log.warning(
                "fine-tune interrupted; the policy is kept in %s: run_agent.py --replay %s "
                "--out NEW_DIR (with this run's other settings) fine-tunes it again without "
                "searching",
                run_dir / "policy.json",
                run_dir / "policy.json",
            )
        raise
    finetuned_acc = evaluate(compressed, splits.test, full_precision=True)
    save_compressed(
        run_dir / "compressed.pt",
        compressed,
        policy,  # type: ignore[arg-type]
        meta={"finetuned_acc": finetuned_acc},
    )
    result = RunResult(
        config=cfg.to_dict(),
        device=device,
        dataset=data.source,
        baseline=baseline,
        compressed=compressed,
        policy=policy,
        baseline_acc=baseline_acc,  # type: ignore[arg-type]
        baseline_proxy_acc=proxy.baseline_acc,
        proxy_config=proxy.config,
        proxy_acc=proxy_result.accuracy,
        finetuned_acc=finetuned_acc,
        finetune=ft,
        search_seconds=search_seconds,
        episodes=episodes,
        proxy_evaluations=(searched if invocations else proxy.evaluations)
        + worker_evaluations(
            cfg,
            episodes[invocations[-1].get("episodes_before", len(episodes)) :]
            if invocations
            else [],
        )
        + sum(i.get("proxy_evaluations", 0) for i in invocations[:-1]),
        invocations=invocations,
        predicted_latency=_predicted_latency(cfg, proxy, policy),  # type: ignore[arg-type]
        budget_met=budget_met,
        final_check=check.to_dict() if check is not None else None,
        search_interrupted=interrupted,
        split_sizes={
            "train": len(splits.train),
            "proxy": len(splits.proxy),
            "test": len(splits.test),
        },
    )
    report = build_report(result, cfg.latency_repeats)
    if cfg.export:
        report.update(write_export(cfg.export, compressed, run_dir))
    write_outputs(run_dir, report, episodes)
    (run_dir / FINETUNE_STATE).unlink(missing_ok=True)  # its result is now safe on disk
    log.info(
        "done: %.2fx fewer parameters, test accuracy %.2f%% (baseline %.2f%%) -> %s",
        report["compression_ratio"],
        100 * finetuned_acc,
        100 * baseline_acc,
        run_dir,
    )
    return report
