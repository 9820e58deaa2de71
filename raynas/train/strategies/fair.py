"""`fair`: FairNAS strict fairness (Chu et al. 2021).

Each step trains m paths that together visit every choice of every dimension, accumulating their
gradients, then takes one optimizer step: no choice gets more updates than another.
"""

from __future__ import annotations

import torch

from raynas.errors import ConfigError
from raynas.train.losses import label_loss
from raynas.train.samplers import fair_paths
from raynas.train.strategies.base import StepContext, Strategy


class FairStrategy(Strategy):
    name = "fair"
    # paths_per_step 0: the largest number of choices of any dimension (FairNAS's m).
    # mean_loss: average the m losses instead of summing them as FairNAS does (same direction,
    # learning rate independent of m).
    DEFAULTS = {"paths_per_step": 0, "mean_loss": False}

    @classmethod
    def check(cls, options, where):
        if options["paths_per_step"] < 0:
            raise ConfigError(f"{where}.paths_per_step: expected an integer >= 0 (0 = automatic), "
                              f"got {options['paths_per_step']}")

    def __init__(self, space, options, seed):
        super().__init__(space, options, seed)
        widest = max(d.size for d in space.dims)
        m = self.options["paths_per_step"] or widest
        if m < widest:
            raise ConfigError(f"strategy.paths_per_step: {m} paths cannot visit all {widest} choices of a "
                              f"dimension of space '{space.name}'; use >= {widest} or 0 (automatic)")
        self.num_paths = m

    def train_step(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> dict[str, float]:
        paths = fair_paths(self.space, self.rng, self.num_paths)
        scale = 1.0 / len(paths) if self.options["mean_loss"] else 1.0
        losses = []
        for i, arch in enumerate(paths):
            _, loss = ctx.forward_backward(x, arch, label_loss(y, ctx.label_smoothing),
                                           sync=i == len(paths) - 1, scale=scale)
            losses.append(float(loss))
        ctx.optimizer_step()
        return {"loss": sum(losses) / len(losses), "paths": float(len(paths))}
