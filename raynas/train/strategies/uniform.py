"""`uniform`: single-path one-shot training (SPOS, Guo et al. 2020), one uniform subnet per step.
With `progressive` (OFA progressive shrinking) the subnet draws only the dims released so far."""

from __future__ import annotations

import torch

from raynas.space import Arch
from raynas.train.losses import label_loss
from raynas.train.samplers import uniform_arch
from raynas.train.strategies.base import StepContext, Strategy


class UniformStrategy(Strategy):
    name = "uniform"
    DEFAULTS = {}
    PROGRESSIVE = True

    def archs(self, epoch: int) -> list[Arch]:
        """The subnet one step of `epoch` trains."""
        return [uniform_arch(self.space, self.rng, self.held_dims(epoch))]

    def train_step(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> dict[str, float]:
        arch, = self.archs(ctx.epoch)
        _, loss = ctx.forward_backward(x, arch, label_loss(y, ctx.label_smoothing))
        ctx.optimizer_step()
        return {"loss": float(loss), **self.progress_metrics(ctx.epoch)}
