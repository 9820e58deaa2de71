"""Dataset builders for supernet training and subnet evaluation.

`build_dataset(cfg, split, resolution)` returns a map-style dataset of (float CHW tensor, int label)
at the space's resolution; `shard_loader` gives each Ray Train rank its shard.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch.utils.data import Dataset

from raynas.data.config import DATASETS, validate_data_config
from raynas.data.loaders import fixed_subset, limit, shard_loader
from raynas.errors import ConfigError

SPLITS = ("train", "val")


def _builder(name: str):
    if name == "digits":
        from raynas.data.embedded import digits_dataset as build
    elif name == "synthetic":
        from raynas.data.embedded import synthetic_dataset as build
    elif name in ("cifar10", "cifar100"):
        from raynas.data.cifar import cifar_dataset as build
    elif name == "imagefolder":
        from raynas.data.encoded import imagefolder_dataset as build
    else:
        from raynas.data.parquet import parquet_dataset as build
    return build


def build_dataset(cfg: Mapping[str, Any] | None, split: str, resolution: int, *, in_channels: int = 3,
                  augment: bool | None = None) -> Dataset:
    """The `split` ("train" or "val") of the dataset described by a `data:` config section.

    Items are normalised float tensors (in_channels x resolution x resolution) and int labels; the
    dataset has a `num_classes` attribute. Augmentation applies to "train" only, as configured
    (`augment=False` turns it off, e.g. for BatchNorm recalibration).
    """
    cfg = validate_data_config(cfg)
    if split not in SPLITS:
        raise ConfigError(f"split: {split!r} is not allowed; allowed: {list(SPLITS)}")
    if not isinstance(resolution, int) or resolution < 1:
        raise ConfigError(f"resolution: expected a positive integer, got {resolution!r}")
    mode = cfg["augment"] if split == "train" and augment is not False else "none"
    dataset = _builder(cfg["name"])(cfg, split, resolution, in_channels, mode)
    cap = cfg["max_train_samples"] if split == "train" else cfg["max_val_samples"]
    return limit(dataset, cap, seed=cfg["split_seed"])


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
        from raynas.data.encoded import imagefolder_num_classes

        n = imagefolder_num_classes(cfg["root"])
        if n < 2:
            raise ConfigError(f"data.root: {cfg['root']} needs at least 2 class folders, found {n}")
        return n
    from raynas.data.parquet import parquet_num_classes

    return parquet_num_classes(cfg)


__all__ = ["DATASETS", "build_dataset", "dataset_num_classes", "fixed_subset", "limit", "shard_loader",
           "validate_data_config"]
