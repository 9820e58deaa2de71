"""Parquet image datasets: one row per image, an image column (encoded bytes or a numeric array)
and an integer label column. A file, or a directory of files read as one dataset."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from raynas.data.encoded import EncodedImageDataset, decode_image_bytes
from raynas.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageTensorDataset, holdout_indices
from raynas.errors import ConfigError


def read_table(path: str | Path, columns: list[str], field: str) -> pa.Table:
    try:
        table = pq.read_table(str(path), columns=columns)
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise ConfigError(f"data.{field}: cannot read columns {columns} from {path} ({exc})") from None
    return table


def _labels(table: pa.Table, column: str, field: str) -> np.ndarray:
    col = table.column(column)
    if not (pa.types.is_integer(col.type)):
        raise ConfigError(f"data.label_column: column '{column}' in data.{field} must hold integers, "
                          f"got {col.type}")
    labels = col.to_numpy().astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ConfigError(f"data.label_column: negative label {labels.min()} in data.{field}")
    return labels


def parquet_num_classes(cfg: dict[str, Any]) -> int:
    if cfg["num_classes"] is not None:
        return cfg["num_classes"]
    top = 0
    for field in ("path", "val_path"):
        if cfg[field] is not None:
            labels = _labels(read_table(cfg[field], [cfg["label_column"]], field), cfg["label_column"], field)
            top = max(top, int(labels.max()) + 1 if labels.size else 0)
    return max(top, 2)


def _array_images(values: list, shape: list[int] | None, field: str) -> torch.Tensor:
    arrays = [np.asarray(v) for v in values]
    first = arrays[0]
    if shape is None:
        if first.ndim == 3:
            # Accept both CHW and HWC; channels are the small axis.
            shape = list(first.shape) if first.shape[0] in (1, 3) else [first.shape[2], *first.shape[:2]]
        elif first.ndim == 2:
            shape = [1, *first.shape]
        else:
            side_gray, side_rgb = math.isqrt(first.size), math.isqrt(first.size // 3)
            if side_gray * side_gray == first.size:
                shape = [1, side_gray, side_gray]
            elif 3 * side_rgb * side_rgb == first.size:
                shape = [3, side_rgb, side_rgb]
            else:
                raise ConfigError(f"data.image_shape: cannot infer the shape of {first.size}-value images "
                                  f"in data.{field}; give [channels, height, width]")
    stacked = np.stack(arrays)
    if stacked.ndim == 4 and list(stacked.shape[1:]) != shape and stacked.shape[3] == shape[0]:
        stacked = stacked.transpose(0, 3, 1, 2)  # HWC -> CHW
    try:
        stacked = stacked.reshape(len(arrays), *shape)
    except ValueError:
        raise ConfigError(f"data.image_shape: {shape} does not fit images of {first.size} values "
                          f"in data.{field}") from None
    if np.issubdtype(stacked.dtype, np.integer):
        return torch.from_numpy(np.clip(stacked, 0, 255).astype(np.uint8))
    return torch.from_numpy(stacked.astype(np.float32))


def parquet_dataset(cfg: dict[str, Any], split: str, resolution: int, channels: int,
                    augment: str) -> Dataset:
    field = "val_path" if split == "val" and cfg["val_path"] is not None else "path"
    image_col, label_col = cfg["image_column"], cfg["label_column"]
    table = read_table(cfg[field], [image_col, label_col], field)
    labels = _labels(table, label_col, field)
    images = table.column(image_col).to_pylist()
    if not images:
        raise ConfigError(f"data.{field}: {cfg[field]} has no rows")
    if isinstance(images[0], dict) and "bytes" in images[0]:  # Hugging Face `Image` feature layout
        images = [row["bytes"] for row in images]
    if cfg["val_path"] is None:
        train_idx, val_idx = holdout_indices(len(labels), cfg["val_fraction"], cfg["split_seed"])
        keep = (train_idx if split == "train" else val_idx).tolist()
        images, labels = [images[i] for i in keep], labels[keep]
    num_classes = parquet_num_classes(cfg)
    if labels.size and labels.max() >= num_classes:
        raise ConfigError(f"data.num_classes: {num_classes} but data.{field} has label {labels.max()}")
    mean, std = cfg["mean"] or IMAGENET_MEAN, cfg["std"] or IMAGENET_STD
    if isinstance(images[0], (bytes, bytearray)):
        return EncodedImageDataset(lambda i: decode_image_bytes(images[i]), labels.tolist(),
                                   resolution=resolution, channels=channels, mean=mean, std=std,
                                   augment=augment, num_classes=num_classes)
    tensor = _array_images(images, cfg["image_shape"], field)
    return ImageTensorDataset(tensor, torch.from_numpy(labels), resolution=resolution, channels=channels,
                              mean=mean, std=std, augment=augment, num_classes=num_classes)
