"""Training data through Ray Train: the Datasets a `TorchTrainer` gets, and a worker's view of them.

"train" is split among the workers (Ray Train's equal split, in a fixed order, so a rank reads the
same rows whenever the epoch is replayed); "bn" (the fixed BN-recalibration images) and "val" are
materialized once on the driver and read whole by every worker from the object store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from raynas.errors import ConfigError

SPLIT = "train"


def trainer_datasets(cfg: dict[str, Any], resolution: int, channels: int) -> dict[str, Any]:
    """`datasets=` and `dataset_config=` for the TorchTrainer of a validated training config."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    from raynas.data.pipeline import eval_dataset, task_cpus, train_dataset, train_feed_info

    data, ev, scaling = cfg["data"], cfg["eval"], cfg["scaling"]
    world, batch = scaling["num_workers"], data["batch_size"]
    rows = world * batch * cfg["steps_per_epoch"] if cfg["steps_per_epoch"] else None
    # The evaluation sets are computed now, before the workers hold their CPUs; training data is read
    # while they train, sharing their CPUs when the cluster has none beyond theirs.
    bn = eval_dataset(data, "train", resolution, channels, num_samples=ev["bn_samples"], seed=ev["seed"])
    val = eval_dataset(data, "val", resolution, channels)
    train = train_dataset(data, resolution, channels, seed=cfg["seed"], rows_per_epoch=rows,
                          cpus=task_cpus(reserved=world * scaling["cpus_per_worker"]))
    per_worker = train_feed_info(train.context).rows_per_epoch // world
    if per_worker < batch:
        raise ConfigError(f"data.batch_size: {batch} per worker exceeds the {per_worker} training images "
                          f"of each of the {world} workers")
    return {"datasets": {SPLIT: train, "bn": bn, "val": val},
            "dataset_config": DataConfig(datasets_to_split=[SPLIT],
                                         execution_options=ExecutionOptions(preserve_order=True))}


@dataclass
class WorkerData:
    """A Ray Train worker's batches: its shard of each epoch, and the whole BN and validation sets."""

    train: Any    # EpochBatches
    bn: Any       # Batches
    val: Any      # Batches

    @classmethod
    def from_shards(cls, data_cfg: dict[str, Any], channels: int, device: torch.device,
                    world_size: int) -> WorkerData:
        import ray.train

        from raynas.data.batches import Batches, EpochBatches, Normalizer
        from raynas.data.pipeline import normalization, train_feed_info

        normalize = Normalizer(*normalization(data_cfg, channels))
        shard = ray.train.get_dataset_shard(SPLIT)
        train = EpochBatches(shard, train_feed_info(shard.get_context()), data_cfg["batch_size"], device, normalize,
                             world_size)
        eval_batch = data_cfg["eval_batch_size"]
        return cls(train, Batches(ray.train.get_dataset_shard("bn"), eval_batch, device, normalize),
                   Batches(ray.train.get_dataset_shard("val"), eval_batch, device, normalize))
