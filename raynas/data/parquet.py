"""Parquet image datasets, read with `ray.data.read_parquet`: one row per image, an image column (encoded
bytes, the Hugging Face {"bytes", "path"} struct, or a numeric array) and an integer label column. A file
or a directory of files, local or at a URI; `val_path` holds the validation rows, else the fixed
hold-out splits `path`. A row's id is a hash of its image and label."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raynas import storage
from raynas.data import keys
from raynas.data.sources import Source, holdout
from raynas.errors import ConfigError


def _read_column(location: str, column: str, field: str) -> pa.ChunkedArray:
    fs, path = storage.resolve(location)
    try:
        return pq.read_table(path, columns=[column], filesystem=fs).column(column)
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise ConfigError(f"data.{field}: cannot read column '{column}' from {storage.display(location)} "
                          f"({str(exc).splitlines()[0][:200]})") from None


def _labels(cfg: dict[str, Any], field: str) -> np.ndarray:
    column = cfg["label_column"]
    col = _read_column(cfg[field], column, field)
    if not pa.types.is_integer(col.type):
        raise ConfigError(f"data.label_column: column '{column}' in data.{field} must hold integers, got {col.type}")
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
            labels = _labels(cfg, field)
            top = max(top, int(labels.max()) + 1 if labels.size else 0)
    return max(top, 2)


def _image_shape(first: np.ndarray, shape: list[int] | None, field: str) -> list[int]:
    """[C, H, W] of array images: given, or inferred (CHW or HWC with 1 or 3 channels, HW, or a flat
    square gray or RGB image)."""
    if shape is not None:
        if math.prod(shape) != first.size:
            raise ConfigError(f"data.image_shape: {shape} does not fit images of {first.size} values in data.{field}")
        return shape
    if first.ndim == 3:
        return list(first.shape) if first.shape[0] in (1, 3) else [first.shape[2], *first.shape[:2]]
    if first.ndim == 2:
        return [1, *first.shape]
    side_gray, side_rgb = math.isqrt(first.size), math.isqrt(first.size // 3)
    if side_gray * side_gray == first.size:
        return [1, side_gray, side_gray]
    if 3 * side_rgb * side_rgb == first.size:
        return [3, side_rgb, side_rgb]
    raise ConfigError(f"data.image_shape: cannot infer the shape of {first.size}-value images in data.{field}; "
                      "give [channels, height, width]")


def _chw(value: Any, shape: list[int]) -> np.ndarray:
    a = np.asarray(value)
    if a.ndim == 3 and list(a.shape) != shape and a.shape[2] == shape[0]:
        a = a.transpose(2, 0, 1)  # HWC -> CHW
    a = a.reshape(shape)
    return np.clip(a, 0, 255).astype(np.uint8) if np.issubdtype(a.dtype, np.integer) else a.astype(np.float32)


def _rows(batch: dict[str, np.ndarray], image_column: str, label_column: str, kind: str,
          shape: list[int] | None) -> dict[str, np.ndarray]:
    values = batch[image_column]
    labels = np.asarray(batch[label_column], dtype=np.int64)
    if kind == "file":
        images = [v["bytes"] if isinstance(v, dict) else v for v in values]  # Hugging Face `Image` feature
        content = [bytes(v) + int(y).to_bytes(8, "little", signed=True) for v, y in zip(images, labels)]
        out_images = np.empty(len(images), dtype=object)
        out_images[:] = [bytes(v) for v in images]
    else:
        arrays = [_chw(v, shape) for v in values]
        content = [a.tobytes() + int(y).to_bytes(8, "little", signed=True) for a, y in zip(arrays, labels)]
        out_images = np.stack(arrays) if arrays else np.zeros((0, *shape), np.float32)
    return {"image": out_images, "label": labels, "id": keys.bytes_ids(content)}


def parquet_source(cfg: dict[str, Any], split: str, cpus: float) -> Source:
    import ray.data

    field = "val_path" if split == "val" and cfg["val_path"] is not None else "path"
    image_col, label_col = cfg["image_column"], cfg["label_column"]
    labels = _labels(cfg, field)
    if not labels.size:
        raise ConfigError(f"data.{field}: {storage.display(cfg[field])} has no rows")
    num_classes = parquet_num_classes(cfg)
    if labels.max() >= num_classes:
        raise ConfigError(f"data.num_classes: {num_classes} but data.{field} has label {labels.max()}")
    first = _read_column(cfg[field], image_col, field).slice(0, 1).to_pylist()[0]
    kind = "file" if isinstance(first, (bytes, dict)) else "array"
    shape = None if kind == "file" else _image_shape(np.asarray(first), cfg["image_shape"], field)

    fs, path = storage.resolve(cfg[field])
    dataset = ray.data.read_parquet(path, filesystem=fs, override_num_blocks=max(1, min(len(labels) // 1024, 64)),
                                    num_cpus=cpus).select_columns([image_col, label_col])
    dataset = dataset.map_batches(_rows, fn_kwargs={"image_column": image_col, "label_column": label_col,
                                                    "kind": kind, "shape": shape},
                                  batch_format="numpy", num_cpus=cpus)
    # Every row's id, to draw the hold-out and the subsets: one pass over the file (no image decoding).
    ids = np.concatenate([b["id"] for b in dataset.select_columns(["id"]).iter_batches(batch_format="numpy")])
    source = Source(dataset, ids, kind, cpus)
    return holdout(source, split, cfg["val_fraction"], cfg["split_seed"]) if cfg["val_path"] is None else source
