"""Losses shared by the strategies: label cross-entropy and distillation from soft targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def label_loss(labels: torch.Tensor, label_smoothing: float = 0.0):
    """loss_fn(logits) -> cross-entropy against integer labels (optionally smoothed)."""
    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    return loss_fn


def soft_target_loss(teacher_logits: torch.Tensor, temperature: float = 1.0):
    """loss_fn(logits) -> KL(teacher || student) on temperature-softened distributions.

    The teacher's logits must be detached: students learn from the teacher, never the reverse.
    Scaled by T^2 so gradient magnitudes do not shrink with the temperature (Hinton et al.).
    """
    if teacher_logits.requires_grad:
        raise ValueError("soft_target_loss: teacher logits must be detached")
    target = F.log_softmax(teacher_logits.float() / temperature, dim=-1)

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        student = F.log_softmax(logits / temperature, dim=-1)
        return F.kl_div(student, target, reduction="batchmean", log_target=True) * temperature ** 2
    return loss_fn


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=-1) == labels).float().mean())
