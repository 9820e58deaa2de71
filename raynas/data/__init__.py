"""Training and evaluation data, through Ray Data.

A `data:` config section (raynas.data.config) names a source: the embedded `digits` / `synthetic`
sets, CIFAR pickles, an ImageFolder tree (`ray.data.read_images`) or Parquet (`ray.data.read_parquet`),
at a local path or a URI. From it the driver builds Ray Datasets (raynas.data.pipeline):

- `train_dataset`: the training split, in a new seeded order each epoch and augmented on CPU in
  `map_batches`; Ray Train splits it among the workers (raynas.data.ray_train).
- `eval_dataset`: a split un-augmented (optionally a fixed seeded subset, e.g. BN recalibration),
  materialized once in the object store.

Consumers iterate them with `Batches` / `EpochBatches` (raynas.data.batches), which normalise the images
on the consumer's device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from raynas.data.config import DATASETS, validate_data_config
from raynas.errors import ConfigError


def dataset_num_classes(cfg: Mapping[str, Any] | None) -> int:
    """Number of classes, read cheaply (no images decoded): the supernet's head size."""
    cfg = validate_data_config(cfg)
    name = cfg["name"]
    if name == "digits":
        return 10
    if name == "synthetic":
        return cfg["num_classes"]
    if name in ("cifar10", "cifar100"):
        from raynas.data.cifar import NUM_CLASSES, cifar_dir

        cifar_dir(name, cfg["root"])  # fails early, naming the missing file
        return NUM_CLASSES[name]
    if name == "imagefolder":
        from raynas.data.imagefolder import imagefolder_num_classes

        n = imagefolder_num_classes(cfg["root"])
        if n < 2:
            raise ConfigError(f"data.root: {cfg['root']} needs at least 2 class folders, found {n}")
        return n
    from raynas.data.parquet import parquet_num_classes

    return parquet_num_classes(cfg)


def __getattr__(name: str):
    # Ray and torch load on first use: validating a config or counting classes needs neither.
    lazy = {"train_dataset": "pipeline", "eval_dataset": "pipeline", "normalization": "pipeline",
            "train_feed_info": "pipeline", "task_cpus": "pipeline", "Batches": "batches",
            "EpochBatches": "batches", "Normalizer": "batches", "trainer_datasets": "ray_train",
            "WorkerData": "ray_train"}
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(f"raynas.data.{lazy[name]}"), name)
    raise AttributeError(f"module 'raynas.data' has no attribute {name!r}")


__all__ = ["DATASETS", "Batches", "EpochBatches", "Normalizer", "WorkerData", "dataset_num_classes", "eval_dataset",
           "normalization", "task_cpus", "train_dataset", "train_feed_info", "trainer_datasets",
           "validate_data_config"]
