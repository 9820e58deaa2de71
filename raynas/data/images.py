"""Image tensors shaped for a supernet: channel matching, resizing, augmentation, normalisation.

Datasets keep images at their native size and resize one item at a time, so a 1797-image digits
set upsampled to 224 px never has to sit in memory at 224 px.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Gray images feed RGB networks by repetition; RGB feeds gray networks by averaging."""
    c = x.shape[-3]
    if c == channels:
        return x
    if c == 1:
        return x.expand(*x.shape[:-3], channels, *x.shape[-2:]).contiguous()
    if channels == 1:
        return x.mean(dim=-3, keepdim=True)
    raise ValueError(f"cannot map {c}-channel images to {channels} channels")


def broadcast_stats(values: Sequence[float], channels: int) -> torch.Tensor:
    values = list(values)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        # ImageNet statistics on gray input: use their mean.
        values = [sum(values) / len(values)] * channels
    return torch.tensor(values, dtype=torch.float32).view(channels, 1, 1)


def resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear resize of one CHW image to resolution x resolution (antialiased when shrinking)."""
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    shrink = x.shape[-1] > resolution or x.shape[-2] > resolution
    return F.interpolate(x.unsqueeze(0), size=(resolution, resolution), mode="bilinear",
                         align_corners=False, antialias=shrink).squeeze(0)


def random_crop_flip(x: torch.Tensor, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """CIFAR-style augmentation at native size: pad by 1/8 of the side, random crop, optional flip."""
    h, w = x.shape[-2:]
    pad = max(1, h // 8)
    padded = F.pad(x.unsqueeze(0), (pad, pad, pad, pad), mode="constant").squeeze(0)
    top, left = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    x = padded[..., top : top + h, left : left + w]
    if flip and torch.rand((), generator=generator).item() < 0.5:
        x = x.flip(-1)
    return x


class ImageTensorDataset(Dataset):
    """In-memory images (uint8 0..255 or float 0..1, N x C x H x W) with integer labels.

    Items are float CHW tensors at `resolution` with `channels` channels, normalised by mean/std.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, resolution: int, channels: int,
                 mean: Sequence[float], std: Sequence[float], augment: str = "none", num_classes: int):
        if images.ndim != 4:
            raise ValueError(f"images: expected N x C x H x W, got shape {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.resolution, self.channels, self.augment = resolution, channels, augment
        self.num_classes = num_classes
        self.mean = broadcast_stats(mean, channels)
        self.std = broadcast_stats(std, channels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index]
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.augment != "none":
            x = random_crop_flip(x, flip=self.augment == "crop_flip")
        x = match_channels(resize(x, self.resolution), self.channels)
        return (x - self.mean) / self.std, int(self.labels[index])


def holdout_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed train/val split of n items: the same on every rank, every run and every machine."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise ValueError(f"val_fraction {val_fraction} leaves no training items out of {n}")
    return perm[n_val:].sort().values, perm[:n_val].sort().values
