"""The consumer side of raynas.data: (images, labels) batches on the consumer's device, normalised there.

A consumer reads a Dataset or a Ray Train shard of one (a `DataIterator`) with `iter_torch_batches`;
the images arrive as float tensors in their stored scale, move to the device, and only then are
normalised with the dataset's mean and std (raynas.data.pipeline.normalization).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import ray
import torch

from raynas.data.pipeline import TrainFeedInfo


class Normalizer:
    """(x - mean) / std per channel, on x's device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean.device != x.device:
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x - self.mean) / self.std


def _batches(source: Any, batch_size: int, device: torch.device | str, normalize: Normalizer,
             drop_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in source.iter_torch_batches(batch_size=batch_size, drop_last=drop_last, device=str(device)):
        yield normalize(batch["image"]), batch["label"]


class Batches:
    """Re-iterable batches of an evaluation Dataset (or shard), in its fixed order, every time alike."""

    def __init__(self, source: Any, batch_size: int, device: torch.device | str, normalize: Normalizer):
        self.source, self.batch_size, self.device, self.normalize = source, batch_size, device, normalize

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return _batches(self.source, self.batch_size, self.device, self.normalize, drop_last=False)


class EpochBatches:
    """One consumer's batches of a training Dataset (raynas.data.pipeline.train_dataset), epoch by epoch.

    With `world_size` consumers reading Ray Train's equal split of it, each gets the same number of
    full batches (`steps`): incomplete ones are dropped, so every rank runs the same steps.
    """

    def __init__(self, source: Any, info: TrainFeedInfo, batch_size: int, device: torch.device | str,
                 normalize: Normalizer, world_size: int = 1):
        self.source, self.info, self.batch_size = source, info, batch_size
        self.device, self.normalize = device, normalize
        self.steps = info.rows_per_epoch // world_size // batch_size

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Every consumer announces the same epoch; Ray Train starts the epoch's execution only once all
        # of them have begun iterating, so the execution sees it (raynas.data.pipeline).
        ray.get(self.info.clock.set.remote(epoch))
        return _batches(self.source, self.batch_size, self.device, self.normalize, drop_last=True)
