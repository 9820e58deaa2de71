"""`sandwich`: the sandwich rule with in-place distillation (US-Nets, Yu & Huang 2019; BigNAS 2020).

Per step: the largest subnet learns from the labels (the only pass with label smoothing; weight
decay enters once per step through the optimizer, i.e. on the largest's update, not once per
subnet), then the smallest and `num_random` random subnets learn from the largest's detached soft
outputs. Gradients of all passes add up into one optimizer step.

`distill` (raynas.train.strategies.distill): `logits` is the above; `none` trains the students on the
labels instead (smoothed like the largest: no in-place distillation at all); `logits+features` adds
`feature_weight` times the attention-transfer loss between the largest's and each student's stage outputs.
`progressive` (OFA progressive shrinking): smallest and random students draw only the released dims.
"""

from __future__ import annotations

import torch

from raynas.errors import ConfigError
from raynas.space import Arch
from raynas.supernets.base import StageFeatures
from raynas.train.losses import accuracy, label_loss, soft_target_loss
from raynas.train.samplers import sandwich_archs
from raynas.train.strategies.base import StepContext, Strategy
from raynas.train.strategies.distill import (
    DISTILL_DEFAULTS,
    check_distill,
    check_feature_family,
    feature_loss,
    uses_features,
    uses_logits,
)


class SandwichStrategy(Strategy):
    name = "sandwich"
    DEFAULTS = {"num_random": 2, "temperature": 1.0, **DISTILL_DEFAULTS}
    PROGRESSIVE = True

    @classmethod
    def check(cls, options, where):
        if options["num_random"] < 0:
            raise ConfigError(f"{where}.num_random: expected an integer >= 0, got {options['num_random']}")
        if not options["temperature"] > 0:
            raise ConfigError(f"{where}.temperature: expected a number > 0, got {options['temperature']}")
        check_distill(options, where)

    @classmethod
    def check_fit(cls, options, space, where="strategy"):
        super().check_fit(options, space, where)
        check_feature_family(options, space, where)

    def prepare_model(self, supernet):
        if uses_features(self.options) and not isinstance(supernet, StageFeatures):
            raise ConfigError(f"strategy.distill: 'logits+features' needs stage features; {type(supernet).__name__} "
                              "does not return them; allowed: 'none' or 'logits'")
        return supernet

    def teacher_arch(self):
        return self.space.max_arch()

    def archs(self, epoch: int) -> list[Arch]:
        """The subnets one step of `epoch` trains: the largest first, then the students."""
        return sandwich_archs(self.space, self.rng, self.options["num_random"], self.held_dims(epoch))

    def train_step(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> dict[str, float]:
        largest, *students = self.archs(ctx.epoch)
        features = uses_features(self.options)
        teacher_fn = label_loss(y, ctx.label_smoothing)
        if features:
            teacher_logits, teacher_feats, teacher_loss = ctx.forward_backward_features(
                x, largest, lambda logits, _: teacher_fn(logits), sync=not students)
        else:
            teacher_logits, teacher_loss = ctx.forward_backward(x, largest, teacher_fn, sync=not students)
        # the students' own loss: KD from the largest, or (distill: none) the labels
        own_fn = soft_target_loss(teacher_logits, self.options["temperature"]) if uses_logits(self.options) \
            else teacher_fn
        own_losses, feature_losses, total = [], [], 0.0
        for i, arch in enumerate(students):
            sync = i == len(students) - 1
            if features:
                parts: dict[str, torch.Tensor] = {}

                def loss_fn(logits, feats, parts=parts):
                    parts["own"], parts["features"] = own_fn(logits), feature_loss(feats, teacher_feats)
                    return parts["own"] + self.options["feature_weight"] * parts["features"]

                _, _, loss = ctx.forward_backward_features(x, arch, loss_fn, sync=sync)
                own_losses.append(float(parts["own"]))
                feature_losses.append(float(parts["features"]))
            else:
                _, loss = ctx.forward_backward(x, arch, own_fn, sync=sync)
                own_losses.append(float(loss))
            total += float(loss)
        ctx.optimizer_step()
        metrics = {"loss": float(teacher_loss) + total,
                   "teacher_loss": float(teacher_loss),
                   "teacher_train_acc": accuracy(teacher_logits, y),
                   **self.progress_metrics(ctx.epoch)}
        if own_losses:
            kind = "kd" if uses_logits(self.options) else "label"
            metrics[f"smallest_{kind}_loss"] = own_losses[0]
            metrics[f"student_{kind}_loss"] = sum(own_losses) / len(own_losses)
        if feature_losses:
            metrics["student_feature_loss"] = sum(feature_losses) / len(feature_losses)
        return metrics
