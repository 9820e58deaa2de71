"""`sandwich`: the sandwich rule with in-place distillation (US-Nets, Yu & Huang 2019; BigNAS 2020).

Per step: the largest subnet learns from the labels (the only pass with label smoothing; weight
decay enters once per step through the optimizer, i.e. on the largest's update, not once per
subnet), then the smallest and `num_random` random subnets learn from the largest's detached soft
outputs. Gradients of all passes add up into one optimizer step.
"""

from __future__ import annotations

import torch

from raynas.errors import ConfigError
from raynas.train.losses import accuracy, label_loss, soft_target_loss
from raynas.train.samplers import sandwich_archs
from raynas.train.strategies.base import StepContext, Strategy


class SandwichStrategy(Strategy):
    name = "sandwich"
    DEFAULTS = {"num_random": 2, "temperature": 1.0}

    @classmethod
    def check(cls, options, where):
        if options["num_random"] < 0:
            raise ConfigError(f"{where}.num_random: expected an integer >= 0, got {options['num_random']}")
        if not options["temperature"] > 0:
            raise ConfigError(f"{where}.temperature: expected a number > 0, got {options['temperature']}")

    def teacher_arch(self):
        return self.space.max_arch()

    def train_step(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> dict[str, float]:
        largest, *students = sandwich_archs(self.space, self.rng, self.options["num_random"])
        teacher_logits, teacher_loss = ctx.forward_backward(
            x, largest, label_loss(y, ctx.label_smoothing), sync=not students)
        kd = soft_target_loss(teacher_logits, self.options["temperature"])
        student_losses = []
        for i, arch in enumerate(students):
            _, loss = ctx.forward_backward(x, arch, kd, sync=i == len(students) - 1)
            student_losses.append(float(loss))
        ctx.optimizer_step()
        metrics = {"loss": float(teacher_loss) + sum(student_losses),
                   "teacher_loss": float(teacher_loss),
                   "teacher_train_acc": accuracy(teacher_logits, y)}
        if student_losses:
            metrics["smallest_kd_loss"] = student_losses[0]
            metrics["student_kd_loss"] = sum(student_losses) / len(student_losses)
        return metrics
