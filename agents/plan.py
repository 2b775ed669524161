"""Before the long work: time this device on a model of the run's shape and print the plan."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from agents.config import RunConfig
from rl_mtd import factorize
from rl_mtd.baselines import SENSITIVITY_LEVELS
from rl_mtd.baselines.sensitivity import study_entries
from rl_mtd.budget import check_target
from rl_mtd.budget_table import BudgetTable
from rl_mtd.data import DataSplits, Split
from rl_mtd.decompose import DECOMPOSED, FactorCache, Rank, conv_layers
from rl_mtd.factorize import default_max_iter, sweep_work
from rl_mtd.models import build_vgg
from rl_mtd.policy import Policy
from rl_mtd.proxy import Proxy, ProxyConfig
from rl_mtd.train import TrainConfig, train

log = logging.getLogger("rl_mtd")

PROBE_REPAIR_STEPS = 4
"""Repair steps the episode probe really runs; the rest are extrapolated from the step time."""

SLOW_STEP_SECONDS = 0.5
"""A training step slower than this after the warm-up (a full-width VGG16 on a CPU: seconds) is
timed once, and a repair step in one short round, so that a dry run there takes a minute or two
rather than ten."""


@dataclass
class Timing:
    step_seconds: float
    """One training step at the run's batch size."""
    episode_seconds: float
    """One proxy evaluation of a new policy whose factors are cached."""
    n_layers: int
    repair_step_seconds: float = 0.0
    """One repair step of a compressed model (what a study with fewer steps saves per step)."""
    study_evals: int | None = None
    """Proxy evaluations of the sensitivity study (None: every layer x method x level)."""
    study_factor_seconds: float = 0.0
    """Factorising the study's options, which its evaluations' time leaves out."""


def measure(
    cfg: RunConfig,
    splits: DataSplits,
    device: torch.device,
    proxy_config: ProxyConfig,
    search: bool,
) -> Timing:
    """Time a training step and, when ``search``, ``Proxy.evaluate`` on an untrained model."""
    torch.manual_seed(cfg.seed)
    probe = build_vgg(cfg.net, width=cfg.width).to(device)
    t_step = _time_train_step(probe, splits.train, cfg.batch_size)
    if not search:
        return Timing(t_step, 0.0, len(conv_layers(probe)))
    t_episode, t_repair = _time_episode(probe, splits, device, proxy_config, t_step)
    evals, factor_seconds = _study_cost(probe)
    return Timing(t_step, t_episode, len(conv_layers(probe)), t_repair, evals, factor_seconds)


def _time_train_step(model: nn.Module, split: Split, batch_size: int) -> float:
    """Seconds per training step on a throwaway copy, after a warm-up (the first steps of a new
    shape are several times slower): one timed step, and where that is not slow (under
    ``SLOW_STEP_SECONDS``) the faster of two timed rounds of a few steps."""
    probe = copy.deepcopy(model)
    n = min(len(split), batch_size * 4)
    sub = Split(split.x[:n], split.y[:n])
    bs = min(batch_size, n)
    train(probe, sub, config=TrainConfig(steps=2, batch_size=bs))

    def per_step(steps: int) -> float:
        t0 = time.perf_counter()
        train(probe, sub, config=TrainConfig(steps=steps, batch_size=bs))
        return (time.perf_counter() - t0) / steps

    one = per_step(1)
    if one > SLOW_STEP_SECONDS:
        return one
    steps = max(2, n // bs)
    return min(per_step(steps) for _ in range(2))


def _time_episode(
    model: nn.Module, splits: DataSplits, device: torch.device, config: ProxyConfig, t_step: float
) -> tuple[float, float]:
    """One ``Proxy.evaluate`` of a uniform Tucker-2 policy, factors cached beforehand, and one
    of its repair steps.

    The probe runs at most ``PROBE_REPAIR_STEPS`` repair steps; the others cost what a repair
    step of the compressed probe costs, timed as the difference between a longer and a shorter
    repair, so distillation in the repair counts (on the 2-core CPU at width 0.25 a step of the
    8x probe cost the same as a dense one, 108 vs 109 ms, and the estimate of a 200-step
    evaluation was within 10% of the 21.5 s it took; a 32x policy took 17.5 s). It factorises
    weight-only: a data-aware fit's one-off moment collection on an untrained probe would be
    work the estimate does not need.
    """
    probe_steps = min(config.repair_steps, PROBE_REPAIR_STEPS)
    proxy = Proxy(
        model,
        train_split=splits.train,
        proxy_split=splits.proxy,
        device=device,
        config=replace(config, repair_steps=probe_steps, fit="weights"),
        cache=FactorCache(),
    )
    policy = _probe_policy(model, proxy)
    compressed = proxy.compress(policy)  # factorise once: the search does that once per option
    t0 = time.perf_counter()
    proxy.evaluate(policy)
    measured = time.perf_counter() - t0
    left = config.repair_steps - probe_steps
    slow = t_step > SLOW_STEP_SECONDS
    t_repair = _repair_step_seconds(proxy, compressed, slow) if left else t_step
    return measured + left * t_repair, t_repair


def _repair_step_seconds(proxy: Proxy, compressed: nn.Module, slow: bool = False) -> float:
    """Seconds per repair step of ``compressed``: the faster of two rounds of (a repair of
    3 x ``PROBE_REPAIR_STEPS`` steps less one of ``PROBE_REPAIR_STEPS``) / the difference, after
    a warm-up; what every repair costs beyond its steps cancels out. ``slow``: one round of
    2 x less 1 x, no warm-up (the probe's evaluation just ran this shape)."""
    config = proxy.config

    def seconds(steps: int) -> float:
        proxy.config = replace(config, repair_steps=steps)
        model = copy.deepcopy(compressed)
        t0 = time.perf_counter()
        proxy.repair(model)
        return time.perf_counter() - t0

    long, n_rounds = (2, 1) if slow else (3, 2)
    try:
        if not slow:
            seconds(PROBE_REPAIR_STEPS)  # warm-up
        rounds = [
            (seconds(long * PROBE_REPAIR_STEPS) - seconds(PROBE_REPAIR_STEPS))
            / ((long - 1) * PROBE_REPAIR_STEPS)
            for _ in range(n_rounds)
        ]
    finally:
        proxy.config = config
    return max(min(rounds), 1e-6)


def _study_cost(model: nn.Module) -> tuple[int, float]:
    """The sensitivity study of ``model``'s shape: its proxy evaluations (one per layer, method
    and distinct rank that shrinks the layer) and the seconds factorising their options takes.

    Per method, two options are timed (the least work and the median): a CP fit by
    ``CALIBRATION_SWEEPS`` sweeps, a Tucker-2 fit whole. The others' time is read off the line
    through them over the work of one sweep (``rl_mtd.factorize.sweep_work``; for Tucker-2 the
    kernel's size times its two ranks): a fixed overhead plus the arithmetic, times the sweep cap
    for CP. An upper bound: a CP fit that converges stops before its cap.
    """
    convs = [conv for _, conv in conv_layers(model)]
    table = BudgetTable(model, DECOMPOSED, SENSITIVITY_LEVELS)
    options = sorted({(i, method, rank) for (i, method, _), rank in study_entries(table)}, key=str)
    seconds = 0.0
    for method in DECOMPOSED:
        mine = [(convs[i].weight.detach(), rank) for i, m, rank in options if m == method]
        if not mine:
            continue
        work = [_fit_work(w, method, rank) for w, rank in mine]
        order = sorted(range(len(mine)), key=lambda k: work[k][1])
        picks = sorted({order[0], order[len(order) // 2]}, key=lambda k: work[k][1])
        timed = [(work[k][1], _time_fit(mine[k][0], method, mine[k][1])) for k in picks]
        seconds += sum(count * _unit_seconds(timed, unit) for count, unit in work)
    return len(options), seconds


CALIBRATION_SWEEPS = 20
"""CP sweeps a calibration fit of ``_study_cost`` runs (its time per sweep is what is used)."""


def _fit_work(weight: torch.Tensor, method: str, rank: Rank) -> tuple[int, float]:
    """(units, multiply-adds per unit) of one fit: CP's sweep cap and the work of a sweep;
    Tucker-2 one unit, the kernel's size times its two ranks."""
    shape = tuple(weight.shape)
    if method == "cp":
        return default_max_iter(shape, rank), float(sweep_work(shape, rank))  # type: ignore[arg-type]
    return 1, float(weight.numel() * sum(rank))  # type: ignore[arg-type]


def _time_fit(weight: torch.Tensor, method: str, rank: Rank) -> float:
    """Seconds of one unit of ``_fit_work``: a CP sweep (of a fit forced to run
    ``CALIBRATION_SWEEPS``), a whole Tucker-2 fit; after a warm-up, synchronised on CUDA."""
    sync = torch.cuda.synchronize if weight.is_cuda else (lambda: None)

    def once() -> float:
        t0 = time.perf_counter()
        if method == "cp":
            f = factorize.cp(weight, rank, max_iter=CALIBRATION_SWEEPS, tol=-math.inf)  # type: ignore[arg-type]
            sync()
            return (time.perf_counter() - t0) / max(f.iterations, 1)
        factorize.tucker2(weight, rank)  # type: ignore[arg-type]
        sync()
        return time.perf_counter() - t0

    once()
    return once()


def _unit_seconds(timed: list[tuple[float, float]], work: float) -> float:
    """Seconds of a unit of ``work`` multiply-adds, on the line ``a + b x work`` through the two
    timed units; in proportion to the nearer one where there is one, or the line would have a
    negative coefficient."""
    if len(timed) == 2:
        (w0, t0), (w1, t1) = timed
        if w1 > w0 and t1 >= t0:
            b = (t1 - t0) / (w1 - w0)
            return t0 + b * (work - w0)
    ref_w, ref_t = min(timed, key=lambda x: abs(math.log(x[0] / work)))
    return ref_t * work / ref_w


def _probe_policy(model: nn.Module, proxy: Proxy) -> Policy:
    from rl_mtd.decompose import rank_for_ratio

    choices = [("tucker2", rank_for_ratio(conv, "tucker2", 8.0)) for _, conv in conv_layers(model)]
    return Policy.from_choices(
        model, choices, net=proxy.net, width=proxy.width, num_classes=proxy.num_classes
    )


def _study_eval_seconds(cfg: RunConfig, timing: Timing) -> float:
    """One study entry: a proxy evaluation with the study's repair steps, not the search's."""
    saved = cfg.repair_steps - cfg.study_steps
    return max(timing.episode_seconds - saved * timing.repair_step_seconds, 0.0)


def print_plan(
    cfg: RunConfig,
    splits: DataSplits,
    device: torch.device,
    timing: Timing,
    need_baseline: bool,
    replay_path: str | None,
    episodes_done: int = 0,
    finetune_done: float | None = None,
    search_done: bool = False,
    baseline_done: float | None = None,
) -> dict[str, float]:
    """Log the plan; its estimated seconds per stage. ``search_done``: a resumed search with
    nothing left, which is not run again (``agents.search.search_finished``)."""
    steps_per_epoch = max(1, len(splits.train) // cfg.batch_size)
    t_step = timing.step_seconds
    # The sensitivity study (warm start, --observe study): each layer alone at each decomposed
    # method and level, one proxy evaluation each; cached per baseline, so often free.
    study_evals = (
        0
        if replay_path or search_done or (cfg.warm_start == "none" and cfg.observe != "study")
        else timing.study_evals
        if timing.study_evals is not None
        else timing.n_layers * len(DECOMPOSED) * len(SENSITIVITY_LEVELS)
    )
    study_factor = timing.study_factor_seconds if study_evals else 0.0
    from agents.ppo import timestep_episodes  # stable-baselines3: only where needed

    # As the search runs them: --timesteps in whole PPO rollouts, else the episodes left, and
    # at least one, in whole rounds of --n-envs (the envs finish their episodes together).
    episodes_left = (
        timestep_episodes(cfg.timesteps, timing.n_layers, cfg.n_envs)
        if cfg.timesteps
        else 0
        if search_done
        else math.ceil(max(1, cfg.episodes - episodes_done) / cfg.n_envs) * cfg.n_envs
    )
    est = {
        "baseline": cfg.baseline_epochs * steps_per_epoch * t_step * (1 - (baseline_done or 0))
        if need_baseline
        else 0.0,
        "study": study_evals * _study_eval_seconds(cfg, timing) + study_factor,
        "search": 0.0 if replay_path else episodes_left * timing.episode_seconds,
        # --final-check: a short fine-tune of each candidate (search time).
        "final check": 0.0
        if replay_path or cfg.final_check < 2
        else cfg.final_check * cfg.final_check_epochs * steps_per_epoch * t_step * 1.3,
        "fine-tune": cfg.finetune_epochs
        * steps_per_epoch
        * t_step
        * 1.3
        * (1 - (finetune_done or 0)),
    }
    targets = [
        f"{check_target(v):g}x {what}"
        for v, what in (
            (cfg.target_ratio, "parameters"),
            (cfg.target_macs, "MACs"),
            (cfg.target_latency, f"faster at batch {cfg.latency_batch}"),
        )
        if v is not None
    ]
    target = " and ".join(targets) if targets else "trade-off"
    baseline = (
        f"train {cfg.baseline_epochs:g} epochs"
        + (f", going on from {baseline_done:.0%}" if baseline_done is not None else "")
        if need_baseline
        else f"{cfg.checkpoint}"
        if cfg.checkpoint
        else "cached from an earlier run"
    )
    resumed = ""
    if cfg.timesteps:
        resumed = f" (--timesteps {cfg.timesteps} in whole PPO rollouts"
        resumed += f"; {episodes_done} done)" if episodes_done else ")"
    elif episodes_done:
        resumed = f" (of {cfg.episodes}; {episodes_done} done)"
    if replay_path:
        search = f"replay {replay_path}"
    elif search_done:
        search = f"finished ({episodes_done} episodes); its best policy is fine-tuned"
    else:
        search = (
            f"{episodes_left} episodes x {timing.n_layers} layers{resumed}, target {target}, "
            f"{cfg.n_envs} env(s), proxy {cfg.bn_batches} BN batches + {cfg.repair_steps} "
            f"repair steps (up to ~{_fmt(est['search'])} if every policy is new, plus "
            "factorising each new layer option once; a repeated policy is read from the memo"
            + (
                "; one warm-started from the heuristic repeats many, often most)"
                if cfg.warm_start == "sensitivity"
                else ")"
            )
        )
    lines = [
        f"plan: {cfg.net} width {cfg.width:g} on {device}, preset {cfg.preset}, seed {cfg.seed}",
        f"  data: {len(splits.train)} train / {len(splits.proxy)} proxy / {len(splits.test)} test",
        f"  1. baseline: {baseline} (~{_fmt(est['baseline'])})",
        *(
            [
                f"  2. sensitivity study: up to {study_evals} proxy evaluations with "
                f"{cfg.study_steps} repair steps each (~{_fmt(est['study'])}"
                + (f", of which ~{_fmt(study_factor)} factorising" if study_factor else "")
                + "; none if cached for this baseline)"
            ]
            if study_evals
            else []
        ),
        f"  {2 + bool(study_evals)}. search: {search}",
        *(
            [
                f"     then the final check: the {cfg.final_check} best policies fine-tuned "
                f"{cfg.final_check_epochs:g} epochs each (~{_fmt(est['final check'])})"
                + (
                    f"; the heuristic's policy kept unless beaten by more than "
                    f"{cfg.final_check_margin:g} paired standard errors"
                    if cfg.warm_start == "sensitivity" and cfg.final_check_margin > 0
                    else ""
                )
            ]
            if est["final check"]
            else []
        ),
        f"  {3 + bool(study_evals)}. fine-tune {cfg.finetune_epochs:g} epochs "
        + (f"going on from {finetune_done:.0%} " if finetune_done is not None else "")
        + f"(~{_fmt(est['fine-tune'])}), then test",
        f"  estimated total ~{_fmt(sum(est.values()))} (from timing {t_step * 1e3:.0f} ms/step, "
        f"{timing.episode_seconds:.1f} s/episode on this device)",
    ]
    for line in lines:
        log.info(line)
    return est


def _fmt(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
