"""Feature distillation: each decomposed block's output pulled towards the layer it replaced.

``rl_mtd.train.train`` uses :class:`FeatureMatch` when ``TrainConfig.feature_kd`` > 0 and a
teacher (the uncompressed model) is given.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class FeatureMatch:
    """Captures each decomposed block's output and its teacher layer's, during training steps.

    Blocks are paired by module name: ``apply_policy`` puts a decomposed block where the conv it
    replaces was, so the teacher (the uncompressed model) has that conv under the same name.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module):
        from rl_mtd.decompose import DecomposedConv  # the decomposition imports training helpers

        teacher_modules = dict(teacher.named_modules())
        self.pairs = [
            (name, block, teacher_modules[name])
            for name, block in student.named_modules()
            if isinstance(block, DecomposedConv) and name in teacher_modules
        ]
        if not self.pairs:
            log.warning("feature distillation: the model has no decomposed blocks to match")
        self.capturing = False
        self.outputs: dict[tuple[str, str], torch.Tensor] = {}
        self.handles = [
            module.register_forward_hook(self._hook(side, name))
            for name, block, original in self.pairs
            for side, module in (("s", block), ("t", original))
        ]

    def _hook(self, side: str, name: str):
        def hook(_module, _inputs, output):
            if self.capturing:
                self.outputs[(side, name)] = output

        return hook

    def loss(self) -> torch.Tensor | None:
        """Mean relative squared error over the blocks captured in the last forward passes."""
        terms = []
        for name, _, _ in self.pairs:
            s, t = self.outputs.get(("s", name)), self.outputs.get(("t", name))
            if s is None or t is None:
                continue
            t = t.detach().float()
            terms.append((s.float() - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-8))
        self.outputs.clear()
        return torch.stack(terms).mean() if terms else None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
