"""End-of-epoch measurement of the supernet during training: teacher, smallest, largest and random
subnets, each after BatchNorm recalibration. The subnets are split across the ranks (each rank
measures its share on the whole validation set) and the accuracies are shared by an all-reduce."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from raynas.space import Arch, SearchSpace
from raynas.train.bn import count_correct, preserved_bn_stats, recalibrate_bn


def epoch_archs(space: SearchSpace, teacher: Arch | None, num_random: int, seed: int,
                epoch: int) -> dict[str, Arch | None]:
    """The subnets measured after `epoch`; random ones depend only on (seed, epoch), so they are
    the same on every rank and do not consume the training RNGs."""
    rng = np.random.default_rng([seed, epoch])
    archs: dict[str, Arch | None] = {"teacher": teacher, "min": space.min_arch(), "max": space.max_arch()}
    for i in range(num_random):
        archs[f"random{i}"] = space.sample(rng)
    return archs


@torch.no_grad()
def evaluate_epoch(module: nn.Module, archs: dict[str, Arch | None], bn_loader: Iterable,
                   val_loader: Iterable, bn_samples: int, device: torch.device, *, rank: int = 0,
                   world_size: int = 1, autocast=contextlib.nullcontext) -> dict[str, Any]:
    """{name}_acc per subnet, plus random_acc (mean of the random ones) and its min / max.

    Rank r measures subnets r, r + W, ...; the module's BN statistics are left as found. Every rank reads
    the same BN and validation batches (raynas.data.ray_train: the whole sets, not shards).
    """
    names = list(archs)
    accs = torch.zeros(len(names), dtype=torch.float64, device=device)
    with preserved_bn_stats(module):
        for i in range(rank, len(names), world_size):
            arch = archs[names[i]]
            with autocast():
                recalibrate_bn(module, arch, bn_loader, bn_samples)
                correct, total = count_correct(module, arch, val_loader)
            accs[i] = correct / max(total, 1)
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(accs)  # each entry was filled by exactly one rank
    values = dict(zip(names, accs.tolist()))
    out: dict[str, Any] = {f"{n}_acc": v for n, v in values.items() if not n.startswith("random")}
    random_accs = [v for n, v in values.items() if n.startswith("random")]
    if random_accs:
        out["random_acc"] = float(np.mean(random_accs))
        out["random_acc_min"] = float(np.min(random_accs))
        out["random_acc_max"] = float(np.max(random_accs))
    return out
