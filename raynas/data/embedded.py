"""Datasets that need no download: scikit-learn's 8x8 `digits` and seeded `synthetic` images.

Both are built in memory on the driver and enter Ray Data once (`ray.data.from_arrow`): the nodes that
train or evaluate read them from the object store.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from raynas.data import keys
from raynas.data.sources import Source, from_arrays


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[:, None]  # N x 1 x 8 x 8, 17 gray levels
    return images, bunch.target.astype(np.int64)


def digits_source(cpus: float) -> Source:
    """scikit-learn's 1797 handwritten digits (8x8, 17 gray levels), 10 classes, before the hold-out."""
    images, labels = _digits()
    return from_arrays(images, labels, cpus)


def digits_stats(cfg: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Mean and std of the training part only, so validation never leaks into them."""
    images, labels = _digits()
    ids = np.arange(len(labels))
    n_val = max(1, int(round(len(ids) * cfg["val_fraction"])))
    val_ids, _ = keys.smallest(ids, n_val, cfg["split_seed"], keys.HOLDOUT)
    train = np.delete(images, val_ids, axis=0)
    return [float(train.mean())], [float(train.std())]


def synthetic_templates(cfg: dict[str, Any]) -> np.ndarray:
    """One smooth random template per class: the classes are separable, so training can learn."""
    import torch

    g = torch.Generator().manual_seed(cfg["seed"])
    size, c = cfg["image_size"], cfg["channels"]
    coarse = torch.rand(cfg["num_classes"], c, max(2, size // 2), max(2, size // 2), generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False).numpy()


def synthetic_arrays(cfg: dict[str, Any], split: str) -> tuple[np.ndarray, np.ndarray]:
    """Seeded images = class template + Gaussian noise; train and val draw different noise."""
    templates = synthetic_templates(cfg)
    n = cfg["num_samples"] if split == "train" else cfg["num_val_samples"]
    rng = np.random.default_rng([cfg["seed"], 1 if split == "train" else 2])
    labels = rng.integers(0, cfg["num_classes"], n)
    images = templates[labels] + cfg["noise"] * rng.standard_normal((n, *templates.shape[1:]), dtype=np.float32)
    return images.astype(np.float32), labels.astype(np.int64)


def synthetic_source(cfg: dict[str, Any], split: str, cpus: float) -> Source:
    return from_arrays(*synthetic_arrays(cfg, split), cpus)


def synthetic_stats(cfg: dict[str, Any]) -> tuple[list[float], list[float]]:
    return cfg["mean"] or [0.5], cfg["std"] or [float((1 / 12 + cfg["noise"] ** 2) ** 0.5)]
