"""DataLoaders for data-parallel training: each rank reads its own shard of the training set."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset


def shard_loader(dataset: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool, seed: int = 0, drop_last: bool = False, num_workers: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """A loader over rank `rank`'s shard (DistributedSampler; call `loader.sampler.set_epoch(e)`).

    The sampler shuffles with (seed, epoch), so every rank agrees on the permutation, shards are
    disjoint, and a resumed run replays exactly the order an uninterrupted run would have seen.
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    # drop_last on the loader too: every rank then runs the same number of steps (DDP needs it),
    # and no batch of 1 reaches BatchNorm in train mode.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0)


def fixed_subset(dataset: Dataset, num_samples: int, seed: int = 0) -> Dataset:
    """The same `num_samples` items (a seeded random subset) wherever and whenever it is asked for."""
    n = len(dataset)
    if num_samples >= n:
        return dataset
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:num_samples]
    return Subset(dataset, perm.sort().values.tolist())


def limit(dataset: Dataset, max_samples: int | None, seed: int = 0) -> Dataset:
    """Cap a dataset's size (tiny runs, tests); keeps the `num_classes` attribute."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    subset = fixed_subset(dataset, max_samples, seed)
    subset.num_classes = dataset.num_classes
    return subset
