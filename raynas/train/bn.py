"""BatchNorm recalibration and subnet accuracy: how every subnet of a supernet is evaluated.

Weight-shared BatchNorm statistics are a blend of every subnet trained through them, so before a
subnet is measured its statistics are recomputed on training images (seed 000 uses 2048): running
statistics are reset and re-estimated as a cumulative average (momentum None) in train mode, with
no gradients and no weight change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from raynas.nn.dynamic import DynamicBatchNorm2d

BN_TYPES = (_BatchNorm, DynamicBatchNorm2d)


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BN_TYPES)]


def _device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def preserved_bn_stats(model: nn.Module) -> Iterator[None]:
    """Restore every BN layer's running statistics (and the model's mode) on exit.

    Lets a training loop measure subnets mid-training without its own statistics being replaced.
    """
    saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in batchnorm_layers(model) if m.running_mean is not None]
    was_training = model.training
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, count in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)
        model.train(was_training)


def _batches(loader: Iterable, num_samples: int) -> Iterator[torch.Tensor]:
    """Images from `loader` until exactly `num_samples` are seen (fewer if it runs out)."""
    seen = 0
    for batch in loader:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        take = min(len(x), num_samples - seen)
        if take <= 0:
            return
        yield x[:take]
        seen += take
        if seen >= num_samples:
            return


@torch.no_grad()
def recalibrate_bn(model: nn.Module, arch: Mapping[str, Any] | None, loader: Iterable,
                   num_samples: int = 2048) -> nn.Module:
    """Recompute BN running statistics of subnet `arch` on `num_samples` images from `loader`.

    Resets the statistics of every `nn.BatchNorm*` and `DynamicBatchNorm2d`, runs
    `model(x, arch)` in train mode with a cumulative average (momentum None) over the batches,
    and returns `model` in eval mode. `loader` yields images or (images, labels) batches, normalised
    (e.g. raynas.data.Batches), on any device; `arch=None` calibrates the supernet's teacher / full net.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples: expected >= 1, got {num_samples}")
    layers = batchnorm_layers(model)
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    device = _device_of(model)
    model.train()
    try:
        for x in _batches(loader, num_samples):
            if len(x) < 2 and any(m.num_batches_tracked > 0 for m in layers):
                break  # a final batch of 1 has no variance; the estimate is complete without it
            model(x.to(device, non_blocking=True), arch)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
    return model.eval()


@torch.no_grad()
def count_correct(model: nn.Module, arch: Mapping[str, Any] | None, loader: Iterable) -> tuple[int, int]:
    """(correct top-1 predictions, total) of `model(x, arch)` in its current mode over `loader`."""
    device = _device_of(model)
    correct = total = 0
    for x, y in loader:
        logits = model(x.to(device, non_blocking=True), arch)
        correct += int((logits.argmax(dim=-1) == y.to(logits.device)).sum())
        total += len(y)
    return correct, total


@torch.no_grad()
def evaluate_subnet(supernet: nn.Module, arch: Mapping[str, Any] | None, bn_loader: Iterable,
                    val_loader: Iterable, bn_samples: int = 2048) -> float:
    """Top-1 accuracy (0..1) of subnet `arch` after recalibrating BN on `bn_samples` images.

    Leaves `supernet` in eval mode with `arch`'s recalibrated statistics (callers that keep
    training wrap the call in `preserved_bn_stats`).
    """
    recalibrate_bn(supernet, arch, bn_loader, bn_samples)
    correct, total = count_correct(supernet, arch, val_loader)
    if total == 0:
        raise ValueError("evaluate_subnet: val_loader yielded no samples")
    return correct / total
