"""`uniform`: single-path one-shot training (SPOS, Guo et al. 2020), one uniform subnet per step."""

from __future__ import annotations

import torch

from raynas.train.losses import label_loss
from raynas.train.samplers import uniform_arch
from raynas.train.strategies.base import StepContext, Strategy


class UniformStrategy(Strategy):
    name = "uniform"
    DEFAULTS = {}

    def train_step(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> dict[str, float]:
        arch = uniform_arch(self.space, self.rng)
        _, loss = ctx.forward_backward(x, arch, label_loss(y, ctx.label_smoothing))
        ctx.optimizer_step()
        return {"loss": float(loss)}
