"""Evaluation and BatchNorm re-estimation: top-1 accuracy, recomputed running statistics, and
the accuracy a model would have with them (what the collapse guard of ``rl_mtd.train`` checks a
fall against).

One code path for CPU and CUDA: on CUDA it adds bf16 autocast; batches are channels_last where
that runs faster (``rl_mtd.data.channels_last_inputs``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from rl_mtd.data import DeviceLoader, Split, channels_last_inputs
from rl_mtd.models import model_device

BN_CHECK_BATCHES = 20
"""Training batches that re-estimate BatchNorm statistics before a held-out fall counts as a
collapse."""


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _full_precision():
    """No autocast, and cuDNN's convolutions without TF32 (on by default), restored after."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def evaluate(
    model: nn.Module, split: Split, *, batch_size: int = 1000, full_precision: bool = False
) -> float:
    """Top-1 accuracy (0..1) of ``model`` on ``split`` (moved to the model's device if needed).

    On CUDA under bf16 autocast, fast enough for the proxy's many evaluations; with
    ``full_precision`` in float32 without TF32 convolutions, as the saved and exported model
    runs by default: what a report states."""
    correct = correct_per_image(model, split, batch_size=batch_size, full_precision=full_precision)
    return int(correct.sum()) / len(correct)


@torch.no_grad()
def correct_per_image(
    model: nn.Module, split: Split, *, batch_size: int = 1000, full_precision: bool = False
) -> torch.Tensor:
    """Whether ``model``'s top-1 class is right, image by image in ``split``'s order (a bool
    tensor on the CPU): what a paired comparison of two models on the same images needs
    (``agents.final_check``). Evaluated as :func:`evaluate` does."""
    if len(split) == 0:
        raise ValueError("cannot evaluate on an empty split")
    device = model_device(model)
    was_training = model.training
    model.eval()
    hits = []
    loader = DeviceLoader(split.to(device), batch_size, channels_last=channels_last_inputs(device))
    with _full_precision() if full_precision else autocast(device):
        for x, y in loader:
            hits.append((model(x).argmax(1) == y).cpu())
    model.train(was_training)
    return torch.cat(hits)


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
        split.to(device),
        batch_size,
        shuffle=True,
        seed=seed,
        channels_last=channels_last_inputs(device),
    )
    try:
        with autocast(device):
            for i, (x, _) in enumerate(loader):
                if i >= batches:
                    break
                model(x)
    finally:
        for bn, m in zip(bns, saved, strict=True):
            bn.momentum = m
        model.train(was_training)


def fresh_bn_accuracy(
    model: nn.Module,
    train_split: Split,
    split: Split,
    *,
    batches: int = BN_CHECK_BATCHES,
    batch_size: int = 128,
    seed: int = 0,
    full_precision: bool = False,
) -> float:
    """Accuracy on ``split`` with BatchNorm statistics re-estimated from ``batches`` batches of
    ``train_split`` (:func:`reestimate_bn`); the model's own statistics are put back afterwards.
    ``full_precision`` as for :func:`evaluate`.

    What the weights are worth apart from stale running statistics: at a high fine-tuning rate
    a CP-heavy 50x model scored 0.369 with its running statistics and 0.481 re-estimated.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [[b.clone() for b in bn.buffers()] for bn in bns]
    try:
        reestimate_bn(model, train_split, batches=batches, batch_size=batch_size, seed=seed)
        return evaluate(model, split, full_precision=full_precision)
    finally:
        with torch.no_grad():
            for bn, bufs in zip(bns, saved, strict=True):
                for b, v in zip(bn.buffers(), bufs, strict=True):
                    b.copy_(v)
