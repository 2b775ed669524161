"""Training and fine-tuning with collapse recovery (evaluation and BatchNorm re-estimation:
``rl_mtd.evaluation``).

One code path for CPU and CUDA: on CUDA it adds bf16 autocast; batches are channels_last where
that runs faster (``rl_mtd.data.channels_last_inputs``).

Collapse recovery: fine-tuning a freshly decomposed network (CP especially) can diverge - in
DESIGN.md's example a CP VGG11 fell from 48% to 22% in two epochs of plain SGD. ``train`` watches
for a non-finite loss and, at each evaluation on the held-out split, for accuracy falling more than
``collapse_drop`` below the best seen while the training loss did not fall since the last
evaluation and that persists with the BatchNorm statistics re-estimated (a fall with the loss
still falling is a noisy evaluation at a high rate, BENCHMARKS.md, "40 epochs" at 32x; one that
a re-estimate undoes is stale running statistics, "the collapse guard's false alarms" at 50x:
both logged, not acted on). Either one restores the best state, cuts the
learning rate, tightens gradient clipping and goes on; the best state is what ``train`` leaves in
the model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rl_mtd.data import DeviceLoader, Split, channels_last_inputs
from rl_mtd.distill import FeatureMatch
from rl_mtd.errors import RlMtdError
from rl_mtd.evaluation import autocast, evaluate, fresh_bn_accuracy
from rl_mtd.models import model_device
from rl_mtd.train_config import (  # noqa: F401 (importable from here, as they always were)
    SCHEDULES,
    TrainConfig,
    TrainProgress,
    TrainResult,
    _lr_factor,
)
from rl_mtd.train_state import load_state, save_state

log = logging.getLogger(__name__)


def _loss(
    logits: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, teacher_logits: torch.Tensor | None
) -> torch.Tensor:
    ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    if teacher_logits is None or cfg.kd_alpha == 0:
        return ce
    t = cfg.kd_temperature
    kd = F.kl_div(
        F.log_softmax(logits.float() / t, 1),
        F.log_softmax(teacher_logits.float() / t, 1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
    return cfg.kd_alpha * kd + (1 - cfg.kd_alpha) * ce


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)  # no decay on BN and biases
    return torch.optim.SGD(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.momentum > 0,
    )


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _Run:
    """One call of :func:`train`: the optimiser, the best state, and the collapse guard."""

    def __init__(
        self,
        model,
        cfg: TrainConfig,
        val_split,
        teacher,
        desc: str,
        steps_per_epoch: int,
        *,
        train_split: Split,
        fresh: bool = True,
    ):
        self.model, self.cfg, self.val, self.teacher, self.desc = (
            model,
            cfg,
            val_split,
            teacher,
            desc,
        )
        self.steps_per_epoch = steps_per_epoch
        self.train_split = train_split
        self.device = model_device(model)
        self.opt = _make_optimizer(model, cfg)
        self.lr_scale, self.clip = 1.0, cfg.grad_clip
        self.recoveries, self.step = 0, 0
        self.restored_at = -1  # the step of the last recovery: losses before it are not comparable
        self.history: list[dict[str, float]] = []
        # Going on from a saved state (not fresh), load() sets these.
        held_out = val_split is not None and fresh
        self.best_acc = evaluate(model, val_split) if held_out else None
        self.best_state = _snapshot(model) if held_out else None
        self.last_acc = self.best_acc
        self._loss_sum, self._loss_n = 0.0, 0
        self.features = (
            FeatureMatch(model, teacher) if teacher is not None and cfg.feature_kd > 0 else None
        )

    def lr_at(self, total: int) -> float:
        return self.cfg.lr * self.lr_scale * _lr_factor(self.cfg.schedule, self.step / total)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> bool:
        """One SGD step; False when the loss was not finite (the step is skipped)."""
        for g in self.opt.param_groups:
            g["lr"] = lr
        use_teacher = self.teacher is not None and self.cfg.uses_teacher
        if self.features is not None:
            self.features.capturing = True
        with autocast(self.device):
            logits = self.model(x)
            with torch.no_grad():
                t_logits = self.teacher(x) if use_teacher else None
        loss = _loss(logits, y, self.cfg, t_logits)
        if self.features is not None:
            self.features.capturing = False
            feature_loss = self.features.loss()
            if feature_loss is not None:
                loss = loss + self.cfg.feature_kd * feature_loss
        self.step += 1
        if not torch.isfinite(loss):
            return False
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self._loss_sum += float(loss.detach())
        self._loss_n += 1
        return True

    def checkpoint(self, lr: float) -> dict[str, float]:
        """Log the mean loss; with a held-out split, keep the best state or recover from a fall."""
        entry = {
            "step": float(self.step),
            "epoch": self.step / self.steps_per_epoch,
            "lr": lr,
            "loss": self._loss_sum / max(self._loss_n, 1),
        }
        self._loss_sum, self._loss_n = 0.0, 0
        if self.val is not None:
            acc = evaluate(self.model, self.val)
            self.model.train()
            entry["val_acc"] = self.last_acc = acc
            if acc > self.best_acc:
                self.best_acc, self.best_state = acc, _snapshot(self.model)
            elif acc < self.best_acc - self.cfg.collapse_drop:
                self._judge_fall(entry, acc)
        self.history.append(entry)
        return entry

    def _judge_fall(self, entry: dict[str, float], acc: float) -> None:
        """A held-out fall past ``collapse_drop``: recover only from a real collapse.

        A fall while the training loss still fell is a noisy evaluation at a high rate, not a
        divergence (a recovery would cut the rate for the rest of the run). Stale running
        BatchNorm statistics alone can cost 10-15 points (a 50x CP fine-tune: 0.514 -> 0.369,
        but 0.499 -> 0.485 with them re-estimated), so a fall counts only when it survives a
        re-estimate. Both false alarms are logged and marked ``dip`` in ``entry``.
        """
        last = self.history[-1] if self.history else None
        # Not against the loss of weights a recovery threw away: any loss looks lower than theirs.
        before = last["loss"] if last is not None and last["step"] > self.restored_at else None
        if before is not None and entry["loss"] < before:
            entry["dip"] = 1.0
            log.info(
                "%s: held-out accuracy dipped to %.3f (best %.3f) while the training loss fell "
                "(%.3f -> %.3f); going on",
                self.desc,
                acc,
                self.best_acc,
                before,
                entry["loss"],
            )
            return
        fresh = entry["val_acc_bn"] = self.fresh_bn_accuracy()
        if fresh >= self.best_acc - self.cfg.collapse_drop:
            entry["dip"] = 1.0
            log.info(
                "%s: held-out accuracy fell to %.3f (best %.3f) with the running BatchNorm "
                "statistics but is %.3f with them re-estimated: stale statistics, not a "
                "collapse; going on",
                self.desc,
                acc,
                self.best_acc,
                fresh,
            )
            return
        entry["recovered"] = 1.0
        self.recover(
            f"held-out accuracy fell to {acc:.3f} (best {self.best_acc:.3f}; "
            f"{fresh:.3f} with BatchNorm statistics re-estimated)"
        )

    def fresh_bn_accuracy(self) -> float:
        """Held-out accuracy with BatchNorm statistics re-estimated
        (:func:`rl_mtd.evaluation.fresh_bn_accuracy`); the running statistics are put back and
        no random state is drawn, so training goes on exactly as it would have."""
        acc = fresh_bn_accuracy(
            self.model,
            self.train_split,
            self.val,
            batch_size=self.cfg.batch_size,
            seed=self.cfg.seed + self.step,
        )
        self.model.train()
        return acc

    def recover(self, reason: str) -> None:
        """Back to the best state with a lower rate, tighter clipping and fresh momentum."""
        self.recoveries += 1
        log.warning(
            "%s: %s at step %d; restoring the best state (recovery %d)",
            self.desc,
            reason,
            self.step,
            self.recoveries,
        )
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.restored_at = self.step
        self._loss_sum, self._loss_n = 0.0, 0  # the next mean loss is of the restored weights
        self.lr_scale *= 0.3
        self.clip = min(self.clip or 1.0, 1.0)
        self.opt = _make_optimizer(self.model, self.cfg)  # the old momentum points at the cliff

    @property
    def gave_up(self) -> bool:
        return self.recoveries > self.cfg.max_recoveries

    def state(self, key: str, total: int, loader_epoch: int, skip: int, seconds: float) -> dict:
        """Everything a later :func:`train` needs to go on exactly from this step."""
        return {
            "format": 1,
            "key": key,
            "config": asdict(self.cfg),
            "total": total,
            "step": self.step,
            "loader_epoch": loader_epoch,
            "skip": skip,
            "seconds": seconds,
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "best_state": self.best_state,
            "best_acc": self.best_acc,
            "last_acc": self.last_acc,
            "lr_scale": self.lr_scale,
            "clip": self.clip,
            "recoveries": self.recoveries,
            "restored_at": self.restored_at,
            "history": self.history,
        }

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.best_state, self.best_acc = state["best_state"], state["best_acc"]
        self.last_acc, self.lr_scale, self.clip = (
            state["last_acc"],
            state["lr_scale"],
            state["clip"],
        )
        self.recoveries, self.step = state["recoveries"], state["step"]
        self.restored_at = state.get("restored_at", -1)  # states saved before it was kept
        self.history = list(state["history"])


def train(
    model: nn.Module,
    train_split: Split,
    *,
    config: TrainConfig | None = None,
    val_split: Split | None = None,
    teacher: nn.Module | None = None,
    on_progress: Callable[[TrainProgress], None] | None = None,
    desc: str = "train",
    state_path: str | Path | None = None,
    state_key: str = "",
) -> TrainResult:
    """Train ``model`` in place on ``train_split`` (SGD with Nesterov momentum).

    With ``val_split``, the model is evaluated ``evals_per_epoch`` times an epoch, collapses are
    detected and recovered from, and the best state is restored at the end. ``on_progress`` is
    called after every step (the CLI draws its progress bar from it); ``desc`` names the run in
    log messages.

    With ``state_path``, the whole state (model, optimiser, best state, collapse guard, where
    the data order stands) is saved there at every evaluation, the last step's included, and a
    later call for the same job (same ``state_key``, settings and length, on a model built the
    same way) goes on from the last save as if never stopped (bit for bit on the CPU). The
    caller removes the file once the result is safe; a save that fails (a full disk) is
    warned about and training goes on without saving.
    """
    cfg = config or TrainConfig()
    device = model_device(model)
    if teacher is not None:
        teacher.eval()
    nhwc = channels_last_inputs(device)
    loader = DeviceLoader(
        train_split.to(device),
        cfg.batch_size,
        shuffle=True,
        augment=cfg.augment,
        drop_last=True,
        seed=cfg.seed,
        channels_last=nhwc,
    )
    if len(loader) == 0:
        raise RlMtdError(
            f"training split of {len(train_split)} images is smaller than one batch of "
            f"{cfg.batch_size}; lower the batch size (--batch-size) or train on more images"
        )
    total = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs * len(loader)))
    eval_every = max(1, len(loader) // max(1, cfg.evals_per_epoch))
    nhwc_weights = nhwc and device.type == "cuda"  # on the CPU NHWC batches alone do as well
    if nhwc_weights:
        model.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    path = Path(state_path) if state_path is not None else None
    saved = load_state(path, state_key, asdict(cfg), total, desc) if path is not None else None
    run = _Run(
        model,
        cfg,
        val_split,
        teacher,
        desc,
        len(loader),
        fresh=saved is None,
        train_split=train_split,
    )
    skip, seconds_before = 0, 0.0
    if saved is not None:
        run.load(saved)
        loader.epoch, skip, seconds_before = saved["loader_epoch"], saved["skip"], saved["seconds"]
        if skip >= len(loader):  # saved at the end of a pass: the next one starts afresh
            loader.epoch, skip = loader.epoch + 1, 0
        log.info("%s: going on from step %d of %d (%s)", desc, run.step, total, path)
    model.train()
    try:
        while run.step < total and not run.gave_up:
            pass_start = run.step - skip  # the step this pass of the loader began at
            for x, y in loader:
                if skip:  # replaying the data order up to the saved step
                    skip -= 1
                    continue
                if run.step >= total or run.gave_up:
                    break
                lr = run.lr_at(total)
                report = TrainProgress(run.step + 1, total)
                if not run.train_step(x, y, lr):
                    run.recover("non-finite loss")
                elif run.step % eval_every == 0 or run.step == total:
                    entry = run.checkpoint(lr)
                    report.loss, report.val_acc = entry["loss"], entry.get("val_acc")
                    if path is not None:
                        seconds = seconds_before + time.perf_counter() - t0
                        state = run.state(
                            state_key, total, loader.epoch - 1, run.step - pass_start, seconds
                        )
                        path = save_state(state, path, desc)
                if on_progress is not None:
                    on_progress(report)
    finally:
        if run.features is not None:
            run.features.remove()  # the model leaves with no hooks, also on Ctrl-C
    if run.best_state is not None:
        model.load_state_dict(run.best_state)
    if nhwc_weights:
        model.to(memory_format=torch.contiguous_format)
    seconds = seconds_before + time.perf_counter() - t0
    return TrainResult(run.best_acc, run.last_acc, run.recoveries, run.step, seconds, run.history)
