"""Feature distillation for in-place (sandwich) and big/little distillation: the `distill` option.

    distill: none | logits | logits+features      feature_weight: 1.0

`logits` is the soft-target KD the strategies always had; `none` drops it; `logits+features` adds,
times `feature_weight`, a loss between the teacher's and the student's stage outputs (FitNets' question
in seed 002 §3.3: intermediate features beyond logits).

The feature loss is attention transfer (Zagoruyko & Komodakis 2017): each stage output F (B, C, H, W)
becomes the spatial map mean_c(F^2), flattened and L2-normalised per sample, and the loss is the squared
distance of student and teacher maps, summed over positions, averaged over the batch and the stages.
Chosen because it needs no projection: teacher and student differ in width (and, with a searched
resolution, in spatial size, which is pooled to the smaller of the two), and a learned 1x1 regressor
would add parameters per (teacher, student) width pair that a weight-sharing supernet and its
checkpoints do not have. A stage whose output is 1x1 carries no spatial map (every normalised map is
1): it adds nothing, so at tiny input sizes only the early stages distil.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from raynas import config as c
from raynas.space import SearchSpace

DISTILL = ("none", "logits", "logits+features")
DISTILL_DEFAULTS = {"distill": "logits", "feature_weight": 1.0}


def check_distill(options: Mapping[str, Any], where: str) -> None:
    c.choice(options["distill"], c.join(where, "distill"), DISTILL)
    c.number(options["feature_weight"], c.join(where, "feature_weight"), 0.0)


def uses_features(options: Mapping[str, Any]) -> bool:
    return options["distill"] == "logits+features"


def uses_logits(options: Mapping[str, Any]) -> bool:
    return options["distill"] != "none"


def check_feature_family(options: Mapping[str, Any], space: SearchSpace, where: str) -> None:
    """Feature distillation needs a supernet that returns stage outputs (`StageFeatures`)."""
    from raynas.supernets.base import StageFeatures, families_implementing

    if uses_features(options) and space.family not in families_implementing(StageFeatures):
        c.fail(c.join(where, "distill"), f"'logits+features' needs stage features, which family '{space.family}' "
               "does not return", f"'none' or 'logits' here; 'logits+features' for families "
               f"{families_implementing(StageFeatures)}")


def attention_map(feature: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H*W) L2-normalised spatial attention of a (B, C, H, W) feature map pooled to `size`."""
    a = feature.float().pow(2).mean(dim=1, keepdim=True)
    if tuple(a.shape[-2:]) != size:
        a = F.adaptive_avg_pool2d(a, size)
    return F.normalize(a.flatten(1), dim=1)


def feature_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention-transfer loss between matching stage outputs (see the module docstring); the teacher's
    features must be detached: students learn from the teacher, never the reverse."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"feature_loss: {len(student)} student vs {len(teacher)} teacher stage outputs")
    if any(t.requires_grad for t in teacher):
        raise ValueError("feature_loss: teacher features must be detached")
    losses = []
    for s, t in zip(student, teacher):
        size = (min(s.shape[-2], t.shape[-2]), min(s.shape[-1], t.shape[-1]))
        losses.append((attention_map(s, size) - attention_map(t, size)).pow(2).sum(dim=1).mean())
    return torch.stack(losses).mean()
