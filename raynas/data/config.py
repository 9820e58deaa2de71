"""Validation of the `data:` section of a training config, before any data is read.

Every dataset shares the loader keys (batch sizes, splits, augmentation); each adds its own
source keys. Errors are one line naming the field (`data.root: ...`) and what is allowed.
Data locations (`root`, `path`, `val_path`) are local paths or URIs (s3://, gs://, ...): Ray Data
reads them from whichever node runs a read, so they are checked through raynas.storage, not the disk.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from raynas import storage
from raynas.errors import ConfigError

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


def _int(cfg: Mapping, key: str, minimum: int, where: str) -> int:
    value = cfg[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{where}.{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def _float(cfg: Mapping, key: str, low: float, high: float, where: str, closed: bool = False) -> float:
    value = cfg[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (low <= value <= high if closed else low < value < high)
    if not ok:
        bounds = f"[{low}, {high}]" if closed else f"({low}, {high})"
        raise ConfigError(f"{where}.{key}: expected a number in {bounds}, got {value!r}")
    return float(value)


def _str(cfg: Mapping, key: str, where: str) -> str:
    value = cfg[key]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key}: expected a non-empty string, got {value!r}")
    return value


def _location(cfg: Mapping, key: str, where: str) -> str:
    """A local path (made absolute, so every node reads the same one) or a URI, as given."""
    try:
        return storage.normalize(_str(cfg, key, where))
    except storage.StorageError as exc:
        raise ConfigError(f"{where}.{key}: {str(exc).split(': ', 1)[-1]}") from None


def _channel_list(cfg: Mapping, key: str, where: str, positive: bool) -> list[float] | None:
    value = cfg[key]
    if value is None:
        return None
    ok = isinstance(value, list) and len(value) in (1, 3)
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ok = ok and (not positive or all(v > 0 for v in value))
    if not ok:
        kind = "positive numbers" if positive else "numbers"
        raise ConfigError(f"{where}.{key}: expected a list of 1 or 3 {kind}, got {value!r}")
    return [float(v) for v in value]


def validate_data_config(cfg: Mapping[str, Any] | None, where: str = "data",
                         check_files: bool = True) -> dict[str, Any]:
    """Return the data config with defaults filled in, or raise `ConfigError` naming the field.

    `check_files` also checks that the paths it names exist (not their contents: reading them is
    compute, and happens on the workers).
    """
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(cfg).__name__}")
    name = cfg.get("name", COMMON_DEFAULTS["name"])
    if name not in DATASETS:
        raise ConfigError(f"{where}.name: unknown dataset {name!r}; allowed: {list(DATASETS)}")
    defaults = {**COMMON_DEFAULTS, **SOURCE_DEFAULTS[name]}
    for key in cfg:
        if key not in defaults:
            raise ConfigError(f"{where}: unknown field '{key}' for dataset '{name}'; "
                              f"allowed: {sorted(defaults)}")
    for key in REQUIRED.get(name, ()):
        if cfg.get(key) is None:
            raise ConfigError(f"{where}.{key}: missing (dataset '{name}' needs it)")
    out = {**defaults, **dict(cfg), "name": name}
    if out["augment"] is None:
        out["augment"] = DEFAULT_AUGMENT[name]
    if out["augment"] not in AUGMENTATIONS:
        raise ConfigError(f"{where}.augment: {out['augment']!r} is not allowed; "
                          f"allowed: {list(AUGMENTATIONS)}")

    _int(out, "batch_size", 1, where)
    _int(out, "eval_batch_size", 1, where)
    _int(out, "split_seed", 0, where)
    _float(out, "val_fraction", 0.0, 1.0, where)
    for key in ("max_train_samples", "max_val_samples"):
        if out[key] is not None:
            _int(out, key, 1, where)
    out["mean"] = _channel_list(out, "mean", where, positive=False)
    out["std"] = _channel_list(out, "std", where, positive=True)
    if (out["mean"] is None) != (out["std"] is None):
        raise ConfigError(f"{where}.mean/std: give both or neither")

    if name == "synthetic":
        _int(out, "num_samples", 1, where)
        _int(out, "num_val_samples", 1, where)
        _int(out, "num_classes", 2, where)
        _int(out, "image_size", 2, where)
        _int(out, "seed", 0, where)
        if out["channels"] not in (1, 3):
            raise ConfigError(f"{where}.channels: expected 1 or 3, got {out['channels']!r}")
        _float(out, "noise", 0.0, 100.0, where, closed=True)
    if name in ("cifar10", "cifar100", "imagefolder"):
        root = _location(out, "root", where)
        if check_files and not storage.is_dir(root):
            raise ConfigError(f"{where}.root: directory {storage.display(root)} does not exist")
        out["root"] = root
    if name == "parquet":
        for key in ("path", "val_path"):
            if out[key] is None:
                continue
            path = _location(out, key, where)
            if check_files and not storage.exists(path):
                raise ConfigError(f"{where}.{key}: {storage.display(path)} does not exist")
            out[key] = path
        _str(out, "image_column", where)
        _str(out, "label_column", where)
        if out["image_column"] == out["label_column"]:
            raise ConfigError(f"{where}.label_column: must differ from {where}.image_column")
        if out["num_classes"] is not None:
            _int(out, "num_classes", 2, where)
        shape = out["image_shape"]
        if shape is not None:
            ok = isinstance(shape, list) and len(shape) == 3 and shape[0] in (1, 3)
            ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
            if not ok:
                raise ConfigError(f"{where}.image_shape: expected [channels (1 or 3), height, width], "
                                  f"got {shape!r}")
    return out
