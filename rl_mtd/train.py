"""Training, fine-tuning with collapse recovery, evaluation and BatchNorm re-estimation.

One code path for CPU and CUDA: on CUDA it adds bf16 autocast and channels_last.

Collapse recovery: fine-tuning a freshly decomposed network (CP especially) can diverge - in
DESIGN.md's example a CP VGG11 fell from 48% to 22% in two epochs of plain SGD. ``train`` watches
for a non-finite loss and, at each evaluation on the held-out split, for accuracy falling more than
``collapse_drop`` below the best seen. Either one restores the best state, cuts the learning
rate, tightens gradient clipping and goes on; the best state is what ``train`` leaves in the model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from rl_mtd.data import DeviceLoader, Split
from rl_mtd.models import model_device

log = logging.getLogger(__name__)

SCHEDULES = ("onecycle", "cosine")


@dataclass
class TrainConfig:
    """Settings of one training or fine-tuning run."""

    epochs: float = 10.0
    """Passes over the training split (fractions allowed)."""
    lr: float = 0.05
    """Peak learning rate."""
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    """``onecycle`` (linear warm-up over 15%, then cosine to zero) or ``cosine`` (short warm-up)."""
    label_smoothing: float = 0.0
    kd_alpha: float = 0.0
    """Weight of the distillation loss from ``teacher`` (0 turns distillation off)."""
    kd_temperature: float = 4.0
    grad_clip: float | None = 5.0
    """Max gradient norm (None: no clipping)."""
    augment: bool = True
    """Random crop (pad 4) and horizontal flip, on the device."""
    evals_per_epoch: int = 1
    """Held-out evaluations per epoch; each may trigger a recovery or become the best state."""
    collapse_drop: float = 0.10
    """Held-out accuracy this far below the best (absolute, 0..1) counts as a collapse."""
    max_recoveries: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.epochs > 0 or not self.lr > 0 or self.batch_size < 1:
            raise ValueError("epochs, lr and batch_size must be positive")
        if not 0 <= self.kd_alpha <= 1:
            raise ValueError(f"kd_alpha must be in [0, 1], got {self.kd_alpha}")


@dataclass
class TrainResult:
    best_acc: float | None
    """Best held-out accuracy (the state left in the model), None without a held-out split."""
    final_acc: float | None
    recoveries: int
    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _lr_factor(schedule: str, t: float) -> float:
    """Learning-rate multiplier at training progress ``t`` in [0, 1]."""
    warm = 0.15 if schedule == "onecycle" else 0.03
    if t < warm:
        return 0.1 + 0.9 * t / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warm) / (1 - warm))))


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, *, batch_size: int = 1000) -> float:
    """Top-1 accuracy (0..1) of ``model`` on ``split`` (moved to the model's device if needed)."""
    if len(split) == 0:
        raise ValueError("cannot evaluate on an empty split")
    device = model_device(model)
    was_training = model.training
    model.eval()
    correct = 0
    loader = DeviceLoader(split.to(device), batch_size, channels_last=device.type == "cuda")
    with _autocast(device):
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return correct / len(split)


@torch.no_grad()
def reestimate_bn(
    model: nn.Module, split: Split, *, batches: int = 20, batch_size: int = 128, seed: int = 0
) -> None:
    """Recompute BatchNorm running statistics from ``batches`` training batches, no gradients.

    The adaptive-BN evaluation of EagleEye (ECCV 2020): a decomposed net's old statistics no
    longer match its activations, so its accuracy straight after decomposition misleads.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    device = model_device(model)
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches seen
    was_training = model.training
    model.train()
    loader = DeviceLoader(
        split.to(device), batch_size, shuffle=True, seed=seed,
        channels_last=device.type == "cuda",
    )  # fmt: skip
    with _autocast(device):
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            model(x)
    for bn, m in zip(bns, saved):
        bn.momentum = m
    model.train(was_training)


def _loss(
    logits: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, teacher_logits: torch.Tensor | None
) -> torch.Tensor:
    ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    if teacher_logits is None or cfg.kd_alpha == 0:
        return ce
    t = cfg.kd_temperature
    kd = F.kl_div(
        F.log_softmax(logits.float() / t, 1), F.log_softmax(teacher_logits.float() / t, 1),
        reduction="batchmean", log_target=True,
    ) * (t * t)  # fmt: skip
    return cfg.kd_alpha * kd + (1 - cfg.kd_alpha) * ce


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)  # no decay on BN and biases
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
    )  # fmt: skip


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(
    model: nn.Module,
    train_split: Split,
    *,
    config: TrainConfig | None = None,
    val_split: Split | None = None,
    teacher: nn.Module | None = None,
    progress: bool = True,
    desc: str = "train",
    on_eval: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``train_split`` (SGD with Nesterov momentum).

    With ``val_split``, the model is evaluated ``evals_per_epoch`` times an epoch, collapses are
    detected and recovered from, and the best state is restored at the end.
    """
    cfg = config or TrainConfig()
    device = model_device(model)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    if teacher is not None:
        teacher.eval()
    train_split = train_split.to(device)
    loader = DeviceLoader(
        train_split, cfg.batch_size, shuffle=True, augment=cfg.augment, drop_last=True,
        seed=cfg.seed, channels_last=device.type == "cuda",
    )  # fmt: skip
    if len(loader) == 0:
        raise ValueError(
            f"training split of {len(train_split)} images is smaller than one batch of "
            f"{cfg.batch_size}; lower the batch size"
        )
    total = max(1, round(cfg.epochs * len(loader)))
    eval_every = max(1, len(loader) // max(1, cfg.evals_per_epoch))
    opt = _make_optimizer(model, cfg)
    lr_scale, clip = 1.0, cfg.grad_clip
    recoveries, step, t0 = 0, 0, time.perf_counter()
    history: list[dict[str, float]] = []
    best_acc = evaluate(model, val_split) if val_split is not None else None
    best_state = _snapshot(model) if val_split is not None else None
    last_acc = best_acc
    running, seen = 0.0, 0

    def recover(reason: str) -> bool:
        nonlocal lr_scale, clip, recoveries, opt
        recoveries += 1
        log.warning("%s: %s at step %d; restoring the best state (recovery %d)", desc, reason,
                    step, recoveries)  # fmt: skip
        if best_state is not None:
            model.load_state_dict(best_state)
        lr_scale *= 0.3
        clip = min(clip or 1.0, 1.0)
        opt = _make_optimizer(model, cfg)  # fresh momentum: the old one points at the cliff
        return recoveries <= cfg.max_recoveries

    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="step")
    model.train()
    stop = False
    while step < total and not stop:
        for x, y in loader:
            if step >= total:
                break
            lr = cfg.lr * lr_scale * _lr_factor(cfg.schedule, step / total)
            for g in opt.param_groups:
                g["lr"] = lr
            with _autocast(device):
                logits = model(x)
                with torch.no_grad():
                    t_logits = teacher(x) if teacher is not None and cfg.kd_alpha > 0 else None
            loss = _loss(logits, y, cfg, t_logits)
            step += 1
            bar.update(1)
            if not torch.isfinite(loss):
                if not recover("non-finite loss"):
                    stop = True
                    break
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            running += float(loss.detach())
            seen += 1
            if step % eval_every == 0 or step == total:
                entry = {"step": float(step), "epoch": step / len(loader), "lr": lr,
                         "loss": running / max(seen, 1)}  # fmt: skip
                running, seen = 0.0, 0
                if val_split is not None:
                    acc = evaluate(model, val_split)
                    model.train()
                    entry["val_acc"] = acc
                    last_acc = acc
                    if acc > best_acc:  # type: ignore[operator]
                        best_acc, best_state = acc, _snapshot(model)
                    elif acc < best_acc - cfg.collapse_drop:  # type: ignore[operator]
                        entry["recovered"] = 1.0
                        if not recover(f"held-out accuracy fell to {acc:.3f} (best {best_acc:.3f})"):
                            stop = True
                    bar.set_postfix(loss=f"{entry['loss']:.3f}", acc=f"{acc:.3f}")
                else:
                    bar.set_postfix(loss=f"{entry['loss']:.3f}")
                history.append(entry)
                if on_eval is not None:
                    on_eval(entry)
                if stop:
                    break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    if device.type == "cuda":
        model.to(memory_format=torch.contiguous_format)
    return TrainResult(best_acc, last_acc, recoveries, step, time.perf_counter() - t0, history)

