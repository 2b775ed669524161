"""What one training or fine-tuning run is told (``TrainConfig``), reports as it goes
(``TrainProgress``) and returns (``TrainResult``), and its learning-rate schedules. The loop
itself: ``rl_mtd.train``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SCHEDULES = ("onecycle", "cosine", "constant")


@dataclass
class TrainConfig:
    """Settings of one training or fine-tuning run."""

    epochs: float = 10.0
    """Passes over the training split (fractions allowed)."""
    steps: int | None = None
    """Exactly this many optimiser steps instead of ``epochs`` (the proxy's repair uses it)."""
    lr: float = 0.05
    """Peak learning rate."""
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    """``onecycle`` (linear warm-up over 15%, then cosine to zero), ``cosine`` (short warm-up) or
    ``constant`` (the same short warm-up, then the peak rate to the end: what the first steps of
    a long run see, for a proxy that should rank policies as a long fine-tune does)."""
    label_smoothing: float = 0.0
    kd_alpha: float = 0.0
    """Weight of the distillation loss from ``teacher`` (0 turns distillation off)."""
    kd_temperature: float = 4.0
    feature_kd: float = 0.0
    """Weight of feature distillation from ``teacher``: each decomposed block's output against the
    output of the teacher's layer of the same name (mean squared error relative to the teacher
    output's mean square, averaged over blocks), added to the loss. 0 turns it off."""
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
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 (or None for epochs), got {self.steps}")
        if not 0 <= self.kd_alpha <= 1:
            raise ValueError(f"kd_alpha must be in [0, 1], got {self.kd_alpha}")
        if not (self.feature_kd >= 0 and math.isfinite(self.feature_kd)):
            raise ValueError(f"feature_kd must be a finite number >= 0, got {self.feature_kd}")

    @property
    def uses_teacher(self) -> bool:
        return self.kd_alpha > 0 or self.feature_kd > 0


@dataclass
class TrainProgress:
    """What a progress callback of :func:`train` receives after every step."""

    step: int
    total: int
    loss: float | None = None
    """Mean training loss since the last evaluation (set at evaluations only)."""
    val_acc: float | None = None
    """Held-out accuracy (set at evaluations with a held-out split only)."""


@dataclass
class TrainResult:
    best_acc: float | None
    """Best held-out accuracy (the state left in the model), None without a held-out split."""
    final_acc: float | None
    recoveries: int
    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def _lr_factor(schedule: str, t: float) -> float:
    """Learning-rate multiplier at training progress ``t`` in [0, 1]."""
    warm = 0.15 if schedule == "onecycle" else 0.03
    if t < warm:
        return 0.1 + 0.9 * t / warm
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warm) / (1 - warm))))
