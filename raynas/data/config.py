"""Validation of the `data:` section of a training config, before any data is read.

Every dataset shares the loader keys (batch sizes, splits, augmentation); each adds its own
source keys. Errors are one line naming the field (`data.root: ...`) and what is allowed.
Data locations (`root`, `path`, `val_path`) are local paths or URIs (s3://, gs://, ...): Ray Data
reads them from whichever node runs a read, so they are checked through raynas.storage, not the disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from raynas import config as c
from raynas import storage

DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "imagefolder", "parquet")
AUGMENTATIONS = ("none", "crop", "crop_flip")

# key -> default (None: optional without default). Shared by every dataset.
COMMON_DEFAULTS: dict[str, Any] = {
    "name": "digits",
    "batch_size": 64,          # per worker
    "eval_batch_size": 256,    # per worker, for validation and BN recalibration
    "augment": None,           # per-dataset default below
    "val_fraction": 0.2,       # hold-out fraction where the source has no validation split
    "split_seed": 0,           # fixes the hold-out split, identical on every rank and every run
    "max_train_samples": None,
    "max_val_samples": None,
    "mean": None,              # per-channel normalisation; None = dataset default
    "std": None,
}

SOURCE_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {},
    "synthetic": {"num_samples": 1024, "num_val_samples": 256, "num_classes": 10, "image_size": 8,
                  "channels": 3, "noise": 0.5, "seed": 0},
    "cifar10": {"root": None},
    "cifar100": {"root": None},
    "imagefolder": {"root": None},
    "parquet": {"path": None, "val_path": None, "image_column": "image", "label_column": "label",
                "image_shape": None, "num_classes": None},
}

DEFAULT_AUGMENT = {"digits": "none", "synthetic": "none", "cifar10": "crop_flip", "cifar100": "crop_flip",
                   "imagefolder": "crop_flip", "parquet": "none"}

REQUIRED = {"cifar10": ("root",), "cifar100": ("root",), "imagefolder": ("root",), "parquet": ("path",)}


def _channel_list(value: Any, field: str, positive: bool) -> list[float] | None:
    """Per-channel mean or std: one number, or one per RGB channel."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) not in (1, 3):
        c.fail(field, f"got {value!r}", f"a list of 1 or 3 {'positive ' if positive else ''}numbers")
    return [c.number(v, f"{field}[{i}]", 0.0 if positive else None, low_open=positive) for i, v in enumerate(value)]


def _image_shape(value: Any, field: str) -> list[int] | None:
    if value is not None and not (isinstance(value, list) and len(value) == 3 and value[0] in (1, 3)):
        c.fail(field, f"got {value!r}", "[channels (1 or 3), height, width]")
    return None if value is None else list(c.int_choices(value, field))


def _data_location(value: Any, field: str, check_files: bool, directory: bool) -> str:
    """A local path (made absolute, so every node reads the same one) or a URI; it must exist when checked."""
    location = c.location(value, field)
    if check_files and not (storage.is_dir(location) if directory else storage.exists(location)):
        c.fail(field, f"{'directory ' if directory else ''}{storage.display(location)} does not exist",
               "an existing " + ("directory" if directory else "file or directory"))
    return location


def validate_data_config(cfg: Mapping[str, Any] | None, where: str = "data",
                         check_files: bool = True) -> dict[str, Any]:
    """Return the data config with defaults filled in, or raise `ConfigError` naming the field.

    `check_files` also checks that the paths it names exist (not their contents: reading them is
    compute, and happens on the workers).
    """
    cfg = {} if cfg is None else c.mapping(cfg, where)
    name = c.choice(cfg.get("name", COMMON_DEFAULTS["name"]), f"{where}.name", DATASETS)
    out = c.with_defaults(cfg, {**COMMON_DEFAULTS, **SOURCE_DEFAULTS[name]}, where)
    for key in REQUIRED.get(name, ()):
        if out[key] is None:
            c.fail(f"{where}.{key}", f"missing (dataset '{name}' needs it)")
    if out["augment"] is None:
        out["augment"] = DEFAULT_AUGMENT[name]
    c.choice(out["augment"], f"{where}.augment", AUGMENTATIONS)

    c.integer(out["batch_size"], c.join(where, "batch_size"), 1)
    c.integer(out["eval_batch_size"], c.join(where, "eval_batch_size"), 1)
    c.integer(out["split_seed"], c.join(where, "split_seed"), 0)
    c.number(out["val_fraction"], c.join(where, "val_fraction"), 0.0, 1.0, low_open=True, high_open=True)
    for key in ("max_train_samples", "max_val_samples"):
        c.integer(out[key], c.join(where, key), 1, optional=True)
    out["mean"] = _channel_list(out["mean"], c.join(where, "mean"), positive=False)
    out["std"] = _channel_list(out["std"], c.join(where, "std"), positive=True)
    if (out["mean"] is None) != (out["std"] is None):
        c.fail(f"{where}.mean/std", "only one given", "both or neither")

    if name == "synthetic":
        for key, minimum in (("num_samples", 1), ("num_val_samples", 1), ("num_classes", 2), ("image_size", 2),
                             ("seed", 0)):
            c.integer(out[key], c.join(where, key), minimum)
        c.choice(c.integer(out["channels"], c.join(where, "channels"), 1, 3), c.join(where, "channels"), (1, 3))
        c.number(out["noise"], c.join(where, "noise"), 0.0, 100.0)
    if name in ("cifar10", "cifar100", "imagefolder"):
        out["root"] = _data_location(out["root"], c.join(where, "root"), check_files, directory=True)
    if name == "parquet":
        for key in ("path", "val_path"):
            if out[key] is not None:
                out[key] = _data_location(out[key], c.join(where, key), check_files, directory=False)
        c.string(out["image_column"], c.join(where, "image_column"))
        c.string(out["label_column"], c.join(where, "label_column"))
        if out["image_column"] == out["label_column"]:
            c.fail(c.join(where, "label_column"), f"must differ from {where}.image_column")
        c.integer(out["num_classes"], c.join(where, "num_classes"), 2, optional=True)
        out["image_shape"] = _image_shape(out["image_shape"], c.join(where, "image_shape"))
    return out
