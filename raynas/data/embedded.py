"""Datasets that need no download: scikit-learn's 8x8 `digits` and seeded `synthetic` images."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from raynas.data.images import ImageTensorDataset, holdout_indices


def digits_dataset(cfg: dict[str, Any], split: str, resolution: int, channels: int,
                   augment: str) -> ImageTensorDataset:
    """scikit-learn's 1797 handwritten digits (8x8, 17 gray levels), 10 classes.

    The split is a fixed hold-out (`val_fraction`, `split_seed`); normalisation statistics come
    from the training part only, so validation never leaks into them.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)  # N x 1 x 8 x 8
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    train_idx, val_idx = holdout_indices(len(labels), cfg["val_fraction"], cfg["split_seed"])
    mean, std = cfg["mean"], cfg["std"]
    if mean is None:
        train = images[train_idx]
        mean, std = [float(train.mean())], [float(train.std())]
    idx = train_idx if split == "train" else val_idx
    return ImageTensorDataset(images[idx], labels[idx], resolution=resolution, channels=channels,
                              mean=mean, std=std, augment=augment, num_classes=10)


def synthetic_templates(cfg: dict[str, Any]) -> torch.Tensor:
    """One smooth random template per class: the classes are separable, so training can learn."""
    g = torch.Generator().manual_seed(cfg["seed"])
    size, c = cfg["image_size"], cfg["channels"]
    coarse = torch.rand(cfg["num_classes"], c, max(2, size // 2), max(2, size // 2), generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def synthetic_dataset(cfg: dict[str, Any], split: str, resolution: int, channels: int,
                      augment: str) -> ImageTensorDataset:
    """Seeded images = class template + Gaussian noise; train and val draw different noise."""
    templates = synthetic_templates(cfg)
    n = cfg["num_samples"] if split == "train" else cfg["num_val_samples"]
    g = torch.Generator().manual_seed(cfg["seed"] * 2 + (1 if split == "train" else 2))
    labels = torch.randint(0, cfg["num_classes"], (n,), generator=g)
    images = templates[labels] + cfg["noise"] * torch.randn(n, *templates.shape[1:], generator=g)
    mean, std = cfg["mean"] or [0.5], cfg["std"] or [float((1 / 12 + cfg["noise"] ** 2) ** 0.5)]
    return ImageTensorDataset(images, labels, resolution=resolution, channels=channels,
                              mean=mean, std=std, augment=augment, num_classes=cfg["num_classes"])
