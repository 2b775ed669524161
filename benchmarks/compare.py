"""At one parameter budget, does the learned mixed policy beat what a user could do without it?

For one baseline and dataset, runs PPO and every baseline strategy at each target, fine-tunes each
result with the same budget and seed, and prints a Markdown table: strategy, target, reached ratio
(parameters, whole model), MACs reduction, proxy accuracy, fine-tuned test accuracy, drop from the
baseline, search seconds, CPU latency speed-up at batch 1 and 128. Draws test accuracy against
compression ratio per strategy as a PNG.

All strategies share one factor cache, pre-filled for every (layer, method, level) option before
the first strategy runs, so search seconds compare search work, not who factorised first; the
ranks that settling at the budget adds off that grid are factorised by whichever strategy meets
them first (seconds at width 0.125 on the CPU, against searches of minutes). Each strategy gets
a fresh proxy (no memoised results carried over); the sensitivity study is measured once and
serves every target, and every row that uses it is charged its full cost. ``random`` and
``local`` get as many new proxy evaluations as the PPO run made at that target (rows.json's
``evaluations``: the new evaluations each made, memoised repeats not counted).

    python benchmarks/compare.py --data ../shared/data/cifar10-jpeg.tar.gz --targets 8,16
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

from _common import add_common_args, add_proxy_args, machine, prefill_factors, proxy_config, setup

from agents.config import RunConfig
from agents.final_check import (
    Candidate,
    episode_candidates,
    final_check,
    policy_key,
    top_candidates,
    with_anchor,
)
from agents.finetune import finetune, held_out_after_finetune
from agents.inputs import latency_model
from agents.presets import STUDY_REPAIR_STEPS, study_steps
from agents.search import search
from agents.studies import cached_study, study_proxy
from rl_mtd.baselines import SENSITIVITY_LEVELS, strategy_policy
from rl_mtd.budget import DEFAULT_LEVELS, Budget
from rl_mtd.errors import RlMtdError, exit_on_user_error
from rl_mtd.evaluation import evaluate
from rl_mtd.io import write_json_atomic, write_text_atomic
from rl_mtd.metrics import count_macs, count_params, measure_latency
from rl_mtd.policy import Policy
from rl_mtd.proxy import Proxy

ALL = ("ppo", "random", "tucker2", "cp", "vbmf", "sensitivity", "local")


ROUNDS = 3
"""Rounds of timing, the two models alternated, so a load that comes and goes on the machine
falls on both rather than on whichever was timed second."""


def _alternated_ratio(a_model, b_model, **kw) -> float:
    """Median time of ``a_model`` over that of ``b_model``, timed in alternating rounds."""
    a, b = [], []
    for _ in range(ROUNDS):
        a.append(measure_latency(a_model, **kw)["median_ms"])
        b.append(measure_latency(b_model, **kw)["median_ms"])
    return statistics.median(a) / statistics.median(b)


def latency_speedup(baseline, compressed, repeats: int) -> tuple[float, float]:
    """Eager speed-up on the CPU at batch 1 and 128."""
    a, b = copy.deepcopy(baseline).cpu(), copy.deepcopy(compressed).cpu()
    return tuple(  # type: ignore[return-value]
        _alternated_ratio(a, b, batch_size=bs, device="cpu", repeats=repeats, warmup=2)
        for bs in (1, 128)
    )


def inference_form_speedup(baseline, compressed, batch: int, repeats: int, device) -> float:
    """Speed-up of ``compressed`` over ``baseline`` at ``batch``, both in their inference form
    on ``device`` (what a latency budget predicts)."""
    from rl_mtd.export import inference_model

    return _alternated_ratio(
        inference_model(baseline, device=device),
        inference_model(compressed, device=device),
        batch_size=batch,
        device=device,
        repeats=max(10, repeats),  # also when --latency-repeats 0 skips the CPU columns
        warmup=2,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--targets", default="8,16", help="comma-separated whole-model targets")
    p.add_argument(
        "--target-macs", type=float, default=None, help="MACs reduction every target also needs"
    )
    p.add_argument(
        "--target-latency",
        type=float,
        default=None,
        help="speed-up every target also needs, predicted by a per-layer latency model timed on "
        "this device at --latency-batch (run_agent.py --target-latency)",
    )
    p.add_argument("--latency-batch", type=int, default=1, help="batch of --target-latency")
    p.add_argument(
        "--strategies",
        default=",".join(ALL),
        help=f"subset of {','.join(ALL)} (commas or spaces between)",
    )
    p.add_argument("--seeds", default="0", help="comma-separated seeds (fine-tune and search)")
    p.add_argument("--episodes", type=int, default=60, help="PPO search episodes per target")
    p.add_argument(
        "--evaluations",
        type=int,
        default=None,
        help="proxy evaluations for random and local (default: as many as PPO made in this "
        "run, else --episodes); set it to rerun them alone against an earlier PPO run (PPO's "
        "count is printed when its search ends and kept as rows.json's 'evaluations': real "
        "evaluations, repeats answered from the proxy's memo not counted, for random and local "
        "as for PPO)",
    )
    p.add_argument(
        "--warm-start",
        default="none",
        choices=["none", "sensitivity"],
        help="PPO starts from the sensitivity heuristic (run_agent.py --warm-start)",
    )
    p.add_argument(
        "--warm-start-prob",
        type=float,
        default=0.85,
        help="how sure of the heuristic's actions behaviour cloning leaves PPO",
    )
    p.add_argument(
        "--imitate-best",
        action="store_true",
        help="PPO clones itself towards every new best (run_agent.py --imitate-best)",
    )
    p.add_argument(
        "--observe",
        default="layer",
        choices=["layer", "study"],
        help="PPO also observes the sensitivity study (run_agent.py --observe)",
    )
    p.add_argument(
        "--study-repair-steps",
        type=int,
        default=None,
        help="repair steps of each sensitivity-study entry (run_agent.py --study-repair-steps; "
        f"default {STUDY_REPAIR_STEPS} or --repair-steps, whichever is fewer); the searches still "
        "score with --repair-steps",
    )
    p.add_argument(
        "--heuristic-settle",
        default="moves",
        choices=["moves", "study"],
        help="how the sensitivity row settles its slack: the layers it moved last first "
        "(moves, run_agent.py's), or one rank step at a time where the study predicts the most "
        "accuracy per share of the budget (study; an experiment)",
    )
    add_proxy_args(p)
    p.add_argument(
        "--finetune-epochs",
        type=float,
        default=1.0,
        help="0: no fine-tune (search and score only; fine-tune the saved policies with "
        "benchmarks/finetune_sweep.py); test accuracy is then the compressed model's as it is",
    )
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--kd", type=float, default=0.0)
    p.add_argument(
        "--feature-kd",
        type=float,
        default=0.0,
        help="feature distillation weight in every fine-tune (run_agent.py's default is 1; 0 "
        "here keeps the tables comparable with the earlier ones)",
    )
    p.add_argument(
        "--final-check",
        type=int,
        default=0,
        metavar="K",
        help="ppo, local and random choose among their K best distinct policies by fine-tuning "
        "each --final-check-epochs epochs (run_agent.py --final-check); counted as search time; "
        "the heuristic's policy is one of the K where the search started from it (local, ppo "
        "--warm-start sensitivity); default 0, unlike run_agent.py's cpu and paper presets (3)",
    )
    p.add_argument("--final-check-epochs", type=float, default=3.0)
    p.add_argument(
        "--final-check-margin",
        type=float,
        default=2.0,
        metavar="Z",
        help="the check leaves the heuristic's policy, where the search started from it, only "
        "for a lead of more than Z paired standard errors on the held-out images (run_agent.py "
        "--final-check-margin; 0: any lead); default 2",
    )
    p.add_argument(
        "--latency-repeats",
        type=int,
        default=10,
        help="timed passes of each CPU speed-up column (batch 1 and 128, eager); 0 skips that "
        "timing and shows '-' there (a GPU run, whose speed benchmarks/latency.py times on the GPU)",
    )
    p.add_argument("--out-dir", default="benchmarks/results/compare")
    args = p.parse_args()
    strategies = args.strategies.replace(",", " ").split()
    unknown = [s for s in strategies if s not in ALL]
    if unknown:
        p.error(f"unknown strategies {unknown}; choose from {', '.join(ALL)}")
    if args.latency_repeats < 0:
        p.error(
            f"--latency-repeats must be >= 0 (0 leaves the CPU speed-ups out), got {args.latency_repeats}"
        )
    if args.evaluations is not None and args.evaluations < 1:
        p.error(f"--evaluations must be >= 1, got {args.evaluations}")
    if args.study_repair_steps is not None and args.study_repair_steps < 0:
        p.error(f"--study-repair-steps must be >= 0, got {args.study_repair_steps}")
    args.study_repair_steps = study_steps(args.repair_steps, args.study_repair_steps)
    if args.final_check < 0 or not args.final_check_epochs > 0:
        p.error("--final-check must be >= 0 and --final-check-epochs positive")
    if not (math.isfinite(args.final_check_margin) and args.final_check_margin >= 0):
        p.error(f"--final-check-margin must be >= 0, got {args.final_check_margin}")
    if not args.finetune_epochs >= 0:
        p.error(f"--finetune-epochs must be >= 0 (0: no fine-tune), got {args.finetune_epochs}")
    targets = [float(t) for t in args.targets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    cfg, splits, baseline, device = setup(args)
    base_test = evaluate(baseline, splits.test, full_precision=True)
    params0, macs0 = count_params(baseline), count_macs(baseline)
    # The agent's and random's levels (DEFAULT_LEVELS) and the sensitivity study's.
    prefill_s, _ = prefill_factors(baseline, sorted(set(DEFAULT_LEVELS) | set(SENSITIVITY_LEVELS)))
    print(
        f"baseline test accuracy {base_test:.4f}; factor cache pre-filled in {prefill_s:.0f} s",
        flush=True,
    )
    proxy_cfg = proxy_config(args)

    def new_proxy() -> Proxy:
        return Proxy(
            baseline,
            train_split=splits.train,
            proxy_split=splits.proxy,
            device=device,
            config=proxy_cfg,
            net=args.net,
            width=args.width,
        )

    # The sensitivity study (disk-cached per baseline and proxy settings) serves sensitivity,
    # local and PPO's warm start; each of those rows is charged its full cost (study.seconds,
    # also when it came from the cache) on top of its own search time.
    study, study_s = None, 0.0
    ppo_uses_study = args.warm_start == "sensitivity" or args.observe == "study"
    if {"sensitivity", "local"} & set(strategies) or ("ppo" in strategies and ppo_uses_study):
        study = cached_study(study_proxy(new_proxy(), args.study_repair_steps))
        study_s = study.seconds
    else:
        args.study_repair_steps = None  # no study: the header names none
    latency = None
    if args.target_latency is not None:
        latency = latency_model(
            RunConfig(
                net=args.net,
                width=args.width,
                target_latency=args.target_latency,
                latency_batch=args.latency_batch,
            ),
            device,
        )
    rows = []
    for seed in seeds:
        for target in targets:
            ppo_evals = None
            budget = Budget(target, args.target_macs, args.target_latency, latency)
            for name in strategies:
                n_evals = args.evaluations or ppo_evals or args.episodes
                proxy = new_proxy()
                scored: list[Candidate] = []  # local and random: every evaluation
                keep = partial(_keep, scored)
                # What the layers' timing cost so far; any later timing falls inside the clock.
                latency_s = latency.seconds if latency is not None else 0.0
                t0 = time.perf_counter()
                try:
                    if name == "ppo":
                        rcfg = RunConfig(
                            net=args.net,
                            width=args.width,
                            episodes=args.episodes,
                            target_ratio=target,
                            target_macs=args.target_macs,
                            target_latency=args.target_latency,
                            latency_batch=args.latency_batch,
                            warm_start=args.warm_start,
                            observe=args.observe,
                            warm_start_prob=args.warm_start_prob,
                            imitate_best=args.imitate_best,
                            study_repair_steps=args.study_repair_steps if ppo_uses_study else None,
                            fit=args.fit,
                            seed=seed,
                            progress=False,
                            on_interrupt="stop",
                        )
                        run_dir = out_dir / f"ppo-{target:g}x-seed{seed}"
                        run_dir.mkdir(parents=True, exist_ok=True)
                        found = search(rcfg, proxy, run_dir, baseline_path="")
                        policy, ppo_evals = found.policy, proxy.evaluations
                        # printed now: a local/random rerun alone takes it as --evaluations
                        print(
                            f"ppo {target:g}x seed {seed}: {ppo_evals} proxy evaluations",
                            flush=True,
                        )
                        if args.final_check > 1:
                            scored = episode_candidates(
                                policy,
                                found.episodes,
                                proxy.model,
                                args.final_check,
                                net=args.net,
                                width=args.width,
                                num_classes=proxy.num_classes,
                                best_score=found.best_reward,
                                anchor=found.warm_start,
                            )
                        if ppo_uses_study:
                            t0 -= study_s  # its cached study is part of its cost
                    elif name in ("sensitivity", "local"):
                        # a fresh proxy (the study's memo would make local's first evaluation,
                        # the heuristic's policy the sensitivity row scored, free)
                        policy = strategy_policy(
                            name,
                            proxy,
                            budget,
                            study=study,
                            seed=seed,
                            n_random=n_evals,
                            on_evaluation=keep,
                            settle_by=args.heuristic_settle,
                        )
                    else:
                        policy = strategy_policy(
                            name, proxy, budget, seed=seed, n_random=n_evals, on_evaluation=keep
                        )
                except RlMtdError as exc:  # a budget this strategy cannot meet: the rest run
                    print(f"| {name} | {target:g}x | {seed} | skipped: {exc} |", flush=True)
                    continue
                search_s = time.perf_counter() - t0
                evaluations = proxy.evaluations  # new ones: memoised repeats are not counted
                if name in ("sensitivity", "local"):
                    search_s += study_s
                search_s += latency_s  # timing the layers the budget uses, as for the study
                if latency is not None:
                    latency.save()  # the grids this search timed, for the next run (if idle)
                ft_cfg = RunConfig(
                    net=args.net,
                    width=args.width,
                    seed=seed,
                    kd=args.kd,
                    feature_kd=args.feature_kd,
                    batch_size=args.batch_size,
                    finetune_epochs=args.finetune_epochs,
                    finetune_lr=args.finetune_lr,
                    progress=not args.no_progress,
                )
                check = None
                if args.final_check > 1 and len({policy_key(c.policy) for c in scored}) > 1:
                    if name == "ppo":  # PPO's come ready, its best first
                        start = found.warm_start
                    else:
                        # local search's first evaluation is its start, the heuristic's policy
                        start = scored[0] if name == "local" else None
                        scored = with_anchor(
                            top_candidates(scored, args.final_check), start, args.final_check
                        )
                    short = replace(ft_cfg, finetune_epochs=args.final_check_epochs)
                    held_out = partial(held_out_after_finetune, short, proxy, baseline, splits)
                    check = final_check(
                        scored,
                        held_out,
                        epochs=args.final_check_epochs,
                        anchor=start.policy if start is not None else None,
                        margin=args.final_check_margin,
                    )
                    policy = check.policy
                    search_s += check.seconds
                res = proxy.evaluate(policy)
                model = proxy.compress(policy)
                ft = finetune(ft_cfg, model, baseline, splits) if args.finetune_epochs > 0 else None
                recoveries = ft.recoveries if ft is not None else 0
                test = evaluate(model, splits.test, full_precision=True)
                b1, b128 = (
                    latency_speedup(baseline, model, args.latency_repeats)
                    if args.latency_repeats > 0
                    else (None, None)
                )
                row = {
                    "strategy": name,
                    "target": target,
                    "seed": seed,
                    "ratio": params0 / count_params(model),
                    "macs_reduction": macs0 / count_macs(model),
                    "proxy_acc": res.accuracy,
                    "test_acc": test,
                    # on the proxy split, which chose the fine-tune's checkpoint: choose recipes
                    # and settings on this, and report the test accuracy of what was chosen
                    "heldout_acc": ft.best_acc if ft is not None else None,
                    "drop": base_test - test,
                    "search_s": search_s,
                    "speedup_b1": b1,
                    "speedup_b128": b128,
                    "recoveries": recoveries,
                    "methods": policy.methods(),
                }
                if name in ("ppo", "local", "random"):
                    row["evaluations"] = evaluations
                if check is not None:
                    row["final_check"] = {
                        "chosen": check.chosen,
                        "seconds": check.seconds,
                        "held_out_acc": [c["held_out_acc"] for c in check.rows],
                        "anchor": check.anchor,
                        "margin": check.margin,
                        "vs_anchor": [c.get("vs_anchor") for c in check.rows],
                        "search_score": [c["search_score"] for c in check.rows],
                        "policies": [c["policy"] for c in check.rows],
                    }
                if latency is not None:
                    row["predicted_speedup"] = latency.speedup(policy.choices())
                    row["inference_form_speedup"] = inference_form_speedup(
                        baseline, model, args.latency_batch, args.latency_repeats, latency.device
                    )
                    row["latency_batch"] = args.latency_batch
                rows.append(row)
                policy.save(out_dir / f"{name}-{target:g}x-seed{seed}.policy.json")
                print(_row(row), flush=True)
                write_json_atomic(out_dir / "rows.json", rows)

    table = _table(rows, cfg, base_test, args) + "\n\n" + _summary(rows)
    print(table)
    write_text_atomic(out_dir / "table.md", table + "\n")
    _plot(rows, out_dir / "accuracy_vs_ratio.png", base_test)
    write_json_atomic(out_dir / "rows.json", rows)
    print(json.dumps({"out_dir": str(out_dir)}))


def _keep(out: list[Candidate], policy: Policy, result) -> None:
    out.append(Candidate(policy, result.accuracy))


def _times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _row(r: dict) -> str:
    out = (
        f"| {r['strategy']} | {r['target']:g}x | {r['seed']} | {r['ratio']:.1f}x | "
        f"{r['macs_reduction']:.1f}x | {100 * r['proxy_acc']:.2f}% | {100 * r['test_acc']:.2f}% "
        f"| {100 * r['drop']:+.2f} | {r['search_s']:.0f} | {_times(r['speedup_b1'])} | "
        f"{_times(r['speedup_b128'])} |"
    )
    if "predicted_speedup" in r:
        out += f" {r['predicted_speedup']:.2f}x | {r['inference_form_speedup']:.2f}x |"
    return out


def _table(rows: list[dict], cfg, base_test: float, args) -> str:
    head = [
        f"{cfg.net} width {cfg.width:g}, baseline test accuracy {100 * base_test:.2f}%; "
        f"fine-tune {args.finetune_epochs:g} epoch(s) at lr {args.finetune_lr:g} (kd {args.kd:g}, "
        f"feature kd {args.feature_kd:g}) "
        f"for every strategy; PPO {args.episodes} episodes (warm start {args.warm_start}, "
        f"observe {args.observe}{', imitating its best' if args.imitate_best else ''}); "
        f"proxy repair {args.repair_steps} steps"
        f"{'' if args.study_repair_steps is None else f', study {args.study_repair_steps}'}; "
        f"{machine()}",
        "",
        "| strategy | target | seed | reached ratio (params) | MACs reduction | proxy acc | "
        "fine-tuned test acc | drop (pts) | search s | CPU speed-up b1 | CPU speed-up b128 |",
        "|-|-:|-:|-:|-:|-:|-:|-:|-:|-:|-:|",
    ]
    if args.target_latency is not None:
        b = args.latency_batch
        head[-2] += f" predicted speed-up b{b} | measured speed-up b{b}, inference forms |"
        head[-1] += "-:|-:|"
    return "\n".join(head + [_row(r) for r in rows])


def _summary(rows: list[dict]) -> str:
    """Mean and spread (min to max) over seeds, per strategy and target."""
    lines = [
        "| strategy | target | seeds | fine-tuned test acc: mean (min-max) | held-out acc: mean "
        "(the best evaluation, which also chose the checkpoint) "
        "| ratio: mean | MACs reduction: mean | search s: mean |",
        "|-|-:|-:|-:|-:|-:|-:|-:|",
    ]
    keys = dict.fromkeys((r["strategy"], r["target"]) for r in rows)
    for name, target in keys:
        group = [r for r in rows if (r["strategy"], r["target"]) == (name, target)]
        acc = [100 * r["test_acc"] for r in group]
        held = [100 * r["heldout_acc"] for r in group if r.get("heldout_acc") is not None]
        lines.append(
            f"| {name} | {target:g}x | {len(group)} | {statistics.mean(acc):.2f}% "
            f"({min(acc):.2f}-{max(acc):.2f}) | "
            f"{f'{statistics.mean(held):.2f}%' if held else '-'} | "
            f"{statistics.mean(r['ratio'] for r in group):.1f}x "
            f"| {statistics.mean(r['macs_reduction'] for r in group):.1f}x | "
            f"{statistics.mean(r['search_s'] for r in group):.0f} |"
        )
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path, base_test: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["strategy"] for r in rows):
        pts = sorted((r["ratio"], r["test_acc"]) for r in rows if r["strategy"] == name)
        ax.plot([x for x, _ in pts], [100 * y for _, y in pts], "o-", label=name)
    ax.axhline(100 * base_test, color="gray", ls="--", label="baseline")
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (parameters, whole model)")
    ax.set_ylabel("fine-tuned test accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    exit_on_user_error(main)
