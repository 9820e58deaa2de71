"""Optimizers and learning-rate schedules built from the `optimizer:` / `scheduler:` config."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def param_groups(params: Iterable[nn.Parameter] | Iterable[dict], weight_decay: float,
                 decay_norm_and_bias: bool) -> list[dict[str, Any]]:
    """Split parameters so norm scales/shifts and biases (1-D tensors) skip weight decay."""
    params = list(params)
    if params and isinstance(params[0], dict):
        return params  # caller built its own groups
    params = [p for p in params if p.requires_grad]
    if decay_norm_and_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def optimizer_factory(cfg: dict[str, Any]):
    """make_optimizer(params, **overrides) for the configured optimizer (overrides: lr, weight_decay...)."""
    def make_optimizer(params, **overrides: Any) -> torch.optim.Optimizer:
        opt = {**cfg, **overrides}
        groups = param_groups(params, opt["weight_decay"], opt["decay_norm_and_bias"])
        if opt["name"] == "sgd":
            return torch.optim.SGD(groups, lr=opt["lr"], momentum=opt["momentum"],
                                   nesterov=opt["nesterov"] and opt["momentum"] > 0)
        return torch.optim.AdamW(groups, lr=opt["lr"], betas=tuple(opt["betas"]))
    return make_optimizer


class WarmupCosine:
    """Multiplier of the base learning rate at optimizer step t: linear warm-up, then cosine to
    `min_ratio` (or constant). A class, not a lambda, so LambdaLR can checkpoint it.

    `restarts`: steps at which the cosine starts again from the full rate, decaying to `min_ratio` by the
    next restart (or the end): OFA restarts its schedule for each progressive-shrinking phase, because a
    phase trains newly released subnets, which a rate decayed over the whole run would barely move."""

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float, cosine: bool = True,
                 restarts: tuple[int, ...] = ()):
        self.total_steps, self.warmup_steps = max(1, total_steps), warmup_steps
        self.min_ratio, self.cosine = min_ratio, cosine
        self.restarts = tuple(r for r in restarts if 0 < r < self.total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if not self.cosine:
            return 1.0
        start = max((r for r in self.restarts if r <= step), default=self.warmup_steps)
        end = min((r for r in self.restarts if r > step), default=self.total_steps)
        progress = min(1.0, (step - start) / max(1, end - start))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: dict[str, Any], steps_per_epoch: int,
                    epochs: int, restart_epochs: tuple[int, ...] = ()) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule over the whole run (stepped after every optimizer step); the cosine starts again
    at each of `restart_epochs` (see WarmupCosine)."""
    fn = WarmupCosine(total_steps=steps_per_epoch * epochs,
                      warmup_steps=int(round(cfg["warmup_epochs"] * steps_per_epoch)),
                      min_ratio=cfg["min_lr_ratio"], cosine=cfg["name"] == "cosine",
                      restarts=tuple(e * steps_per_epoch for e in restart_epochs))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict[str, Any]) -> None:
    """Restore the step count but keep the schedule of the current config: a run resumed with more
    epochs follows the longer schedule from where it stopped instead of the finished short one."""
    state = {**state, "lr_lambdas": [None] * len(scheduler.lr_lambdas)}  # None: keep the current one
    scheduler.load_state_dict(state)
    for group, base_lr, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
