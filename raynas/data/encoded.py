"""Datasets of encoded image files (PNG/JPEG): torchvision ImageFolder trees and Parquet byte columns."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from raynas.data.images import IMAGENET_MEAN, IMAGENET_STD, broadcast_stats, match_channels

# Eval resizing follows the ImageNet convention: shorter side to res/0.875, then centre crop.
CROP_RATIO = 0.875


def pil_transform(resolution: int, augment: str) -> Callable[[Image.Image], torch.Tensor]:
    if augment == "none":
        steps = [transforms.Resize(int(round(resolution / CROP_RATIO))), transforms.CenterCrop(resolution)]
    else:
        steps = [transforms.RandomResizedCrop(resolution, scale=(0.35, 1.0))]
        if augment == "crop_flip":
            steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose([*steps, transforms.PILToTensor()])


class EncodedImageDataset(Dataset):
    """Items decoded on access by `load(i) -> PIL image`, then resized, augmented and normalised."""

    def __init__(self, load: Callable[[int], Image.Image], labels: Sequence[int], *, resolution: int,
                 channels: int, mean: Sequence[float], std: Sequence[float], augment: str, num_classes: int):
        self.load = load
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        self.channels, self.num_classes = channels, num_classes
        self.transform = pil_transform(resolution, augment)
        self.mean = broadcast_stats(mean, channels)
        self.std = broadcast_stats(std, channels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.load(index)
        image = image.convert("L" if image.mode in ("L", "I", "I;16", "1") else "RGB")
        x = self.transform(image).float().div_(255.0)
        x = match_channels(x, self.channels)
        return (x - self.mean) / self.std, int(self.labels[index])


def imagefolder_dataset(cfg: dict[str, Any], split: str, resolution: int, channels: int,
                        augment: str) -> Dataset:
    """`root/train/<class>/*.png` + `root/val/<class>/...`, or `root/<class>/...` split by hold-out."""
    from torchvision.datasets import ImageFolder

    from raynas.data.images import holdout_indices
    from raynas.errors import ConfigError

    root = Path(cfg["root"])
    has_splits = (root / "train").is_dir() and (root / "val").is_dir()
    try:
        folder = ImageFolder(str(root / split) if has_splits else str(root))
    except (FileNotFoundError, RuntimeError) as exc:
        raise ConfigError(f"data.root: {root} is not an image folder tree ({exc})") from None
    samples = folder.samples
    if not has_splits:
        train_idx, val_idx = holdout_indices(len(samples), cfg["val_fraction"], cfg["split_seed"])
        samples = [samples[i] for i in (train_idx if split == "train" else val_idx).tolist()]
    paths = [p for p, _ in samples]
    return EncodedImageDataset(lambda i: Image.open(paths[i]), [label for _, label in samples],
                               resolution=resolution, channels=channels,
                               mean=cfg["mean"] or IMAGENET_MEAN, std=cfg["std"] or IMAGENET_STD,
                               augment=augment, num_classes=len(folder.classes))


def imagefolder_num_classes(root: str | Path) -> int:
    root = Path(root)
    base = root / "train" if (root / "train").is_dir() and (root / "val").is_dir() else root
    return sum(1 for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))


def decode_image_bytes(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
