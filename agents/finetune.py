"""The fine-tune stage: fine-tuning a compressed model (one-shot or in stages, resumable) and the
final check that picks among a search's best candidates by short fine-tunes.

``agents.pipeline.run`` calls these; the benchmark scripts use them to fine-tune exactly as a
run does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from agents.config import RunConfig
from agents.final_check import (
    FINAL_CHECK_FILE,
    Candidate,
    CheckResult,
    HeldOut,
    episode_candidates,
    final_check,
)
from agents.progress import train_bar
from rl_mtd.data import DataSplits
from rl_mtd.evaluation import correct_per_image, reestimate_bn
from rl_mtd.metrics import count_params
from rl_mtd.policy import Policy
from rl_mtd.proxy import Proxy
from rl_mtd.staged import compress_in_stages
from rl_mtd.train import TrainConfig, TrainResult, train

log = logging.getLogger("rl_mtd")

FINETUNE_STATE = "finetune_state.pt"
"""Where an interrupted fine-tune's state waits for ``--resume`` (removed once the run's
outputs are written)."""


def finetune(
    cfg: RunConfig,
    compressed: nn.Module,
    baseline: nn.Module,
    splits: DataSplits,
    *,
    epochs: float | None = None,
    seed_offset: int = 0,
    state_path: Path | None = None,
    state_key: str = "",
) -> TrainResult:
    """Fine-tune ``compressed`` in place, distilling from ``baseline`` when ``--kd`` or
    ``--feature-kd`` ask for it; ``epochs`` defaults to ``--finetune-epochs``. With
    ``state_path``, an interrupted fine-tune of the same job goes on from its last save."""
    tcfg = TrainConfig(
        epochs=epochs if epochs is not None else cfg.finetune_epochs,
        lr=cfg.finetune_lr,
        weight_decay=cfg.finetune_weight_decay,
        label_smoothing=cfg.finetune_label_smoothing,
        batch_size=cfg.batch_size,
        schedule="cosine",
        kd_alpha=cfg.kd,
        feature_kd=cfg.feature_kd,
        seed=cfg.seed + seed_offset,
        evals_per_epoch=2,
    )
    with train_bar("fine-tune", cfg.progress) as bar:
        result = train(
            compressed,
            splits.train,
            config=tcfg,
            val_split=splits.proxy,
            teacher=baseline if tcfg.uses_teacher else None,
            on_progress=bar,
            desc="fine-tune",
            state_path=state_path,
            state_key=state_key,
        )
    compressed.eval()
    return result


def finetune_state_key(policy: Policy, proxy: Proxy) -> str:
    """Which job an interrupted fine-tune's state belongs to: the policy and the baseline it was
    applied to (the proxy's kernel hashes), so a baseline retrained since starts afresh."""
    return json.dumps([policy.to_dict()["layers"], proxy.wkeys], sort_keys=True)


def compress_and_finetune(
    cfg: RunConfig,
    proxy: Proxy,
    policy: Policy,
    baseline: nn.Module,
    splits: DataSplits,
    run_dir: Path | None = None,
) -> tuple[nn.Module, TrainResult]:
    """The compressed, fine-tuned model: one-shot, or in ``--stages`` stages (each stage's
    BatchNorm statistics re-estimated, then its share of the fine-tune epochs).

    With ``run_dir``, a one-shot fine-tune saves its state there as it goes, and goes on from
    an interrupted one of the same policy (``--resume``); a staged one starts over."""
    if cfg.stages == 1:
        compressed = proxy.compress(policy)
        state_path = run_dir / FINETUNE_STATE if run_dir is not None else None
        key = finetune_state_key(policy, proxy)
        ft = finetune(cfg, compressed, baseline, splits, state_path=state_path, state_key=key)
        return compressed, ft
    results: list[TrainResult] = []

    def stage(model: nn.Module, k: int) -> None:
        ratio = count_params(baseline) / count_params(model)
        log.info("compression stage %d of %d: %.2fx fewer parameters", k + 1, cfg.stages, ratio)
        reestimate_bn(model, splits.train, batches=max(1, cfg.bn_batches), seed=cfg.seed + k)
        epochs = cfg.finetune_epochs / cfg.stages
        results.append(finetune(cfg, model, baseline, splits, epochs=epochs, seed_offset=1000 * k))

    compressed = compress_in_stages(baseline, policy, cfg.stages, stage, cache=proxy.cache)
    last = results[-1]
    merged = TrainResult(
        best_acc=last.best_acc,
        final_acc=last.final_acc,
        recoveries=sum(r.recoveries for r in results),
        steps=sum(r.steps for r in results),
        seconds=sum(r.seconds for r in results),
        history=[h for r in results for h in r.history],
    )
    return compressed, merged


def run_final_check(
    cfg: RunConfig,
    proxy: Proxy,
    best: Policy,
    episodes: list[dict[str, Any]],
    baseline: nn.Module,
    splits: DataSplits,
    run_dir: Path | None = None,
    best_reward: float | None = None,
    warm_start: Candidate | None = None,
) -> CheckResult | None:
    """``--final-check``: the search's ``cfg.final_check`` best distinct policies, each compressed
    and fine-tuned ``cfg.final_check_epochs`` epochs as the final fine-tune would be (same
    recipe and seed, stages included), the best on the held-out split kept. ``warm_start``: the
    policy the search started from (scored by its reward), kept among the candidates (a search state
    written before it was recorded has none). None when fewer than two distinct candidates
    (the warm start's included) leave nothing to choose between."""
    candidates = episode_candidates(
        best,
        episodes,
        proxy.model,
        cfg.final_check,
        net=cfg.net,
        width=cfg.width,
        num_classes=proxy.num_classes,
        best_score=best_reward,
        anchor=warm_start,
    )
    if len(candidates) < 2:
        log.info(
            "final check: one distinct candidate only (the search's best is its start); nothing "
            "to choose"
        )
        return None
    short = replace(cfg, finetune_epochs=cfg.final_check_epochs)
    score = partial(held_out_after_finetune, short, proxy, baseline, splits)
    path = run_dir / FINAL_CHECK_FILE if run_dir is not None else None
    return final_check(
        candidates,
        score,
        epochs=cfg.final_check_epochs,
        path=path,
        anchor=warm_start.policy if warm_start is not None else None,
        margin=cfg.final_check_margin,
    )


def held_out_after_finetune(
    cfg: RunConfig, proxy: Proxy, baseline: nn.Module, splits: DataSplits, policy: Policy
) -> HeldOut:
    """The final check's score of ``policy``: held-out accuracy after ``cfg.finetune_epochs``
    of ``cfg``'s fine-tune (the best state's, the one the fine-tune keeps), and image by image
    whether that state was right (for the paired comparison with the search's start)."""
    model, _ = compress_and_finetune(cfg, proxy, policy, baseline, splits)
    # Ranked by the same measurement the paired lead is computed from (on CUDA a second
    # evaluation under autocast may flip a near-tie image or two from the fine-tune's own).
    correct = correct_per_image(model, splits.proxy).numpy()
    return HeldOut(int(correct.sum()) / len(correct), correct)
