"""CPU preprocessing of image batches, run by Ray Data's `map_batches` (numpy in, numpy out).

A batch leaves as float32 images (N x channels x resolution x resolution, values as stored: 0..1 for
8-bit images) and int64 labels. Normalisation (mean/std) is not applied here: the consumer applies
it on its own device (raynas.data.batches), after the transfer.

Two kinds of sources:
- "array": in-memory CHW arrays (digits, synthetic, CIFAR, numeric Parquet columns), kept at their
  native size; augmentation is the CIFAR one (pad by 1/8 of the side, random crop, optional flip),
  then a bilinear resize to the resolution.
- "file": encoded or decoded image files of any size (ImageFolder, Parquet bytes); evaluation
  resizes the shorter side to resolution/0.875 and crops the centre (the ImageNet convention),
  training takes a RandomResizedCrop (scale 0.35..1) and optionally a flip.

Augmentation draws from a generator seeded by (seed, epoch, row id) (raynas.data.keys): an epoch of
a resumed run is augmented exactly like that epoch of an uninterrupted run.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from raynas.data import keys

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("none", "crop", "crop_flip")
CROP_RATIO = 0.875  # evaluation of file images: shorter side to resolution / 0.875, centre crop
CROP_SCALE = (0.35, 1.0)


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


def resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear resize of N x C x H x W images to resolution x resolution (antialiased when shrinking)."""
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    shrink = x.shape[-1] > resolution or x.shape[-2] > resolution
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=shrink)


def crop_flip(x: torch.Tensor, flip: bool, rng: np.random.Generator) -> torch.Tensor:
    """CIFAR-style augmentation of one CHW image at native size: zero-pad by 1/8 of the side, random
    crop back to the original size, flip horizontally with probability 1/2 when `flip`."""
    h, w = x.shape[-2:]
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="constant")
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    x = padded[..., top : top + h, left : left + w]
    if flip and rng.random() < 0.5:
        x = x.flip(-1)
    return x


def _as_float(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.array(images))  # a writable copy: Ray's batch arrays are read-only views
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _row_rngs(seed: int, epoch: int, ids: np.ndarray) -> list[np.random.Generator]:
    return [np.random.default_rng(int(k)) for k in keys.row_keys(ids, seed, keys.AUGMENT, epoch)]


def _array_batch(images: np.ndarray, resolution: int, channels: int, augment: str,
                 rngs: list[np.random.Generator] | None) -> torch.Tensor:
    x = _as_float(np.stack(list(images)) if images.dtype == object else images)
    if rngs is not None:
        x = torch.stack([crop_flip(img, augment == "crop_flip", rng) for img, rng in zip(x, rngs)])
    return match_channels(resize(x, resolution), channels)


def _pil(image: Any) -> Image.Image:
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
        image.load()
    else:
        image = np.asarray(image)
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    return image.convert("L" if image.mode in ("L", "I", "I;16", "1", "LA") else "RGB")


def _file_image(image: Any, resolution: int, augment: str, rng: np.random.Generator | None) -> torch.Tensor:
    from torchvision.transforms import CenterCrop, RandomResizedCrop, Resize
    from torchvision.transforms.functional import hflip, pil_to_tensor, resized_crop

    image = _pil(image)
    if rng is None:
        image = CenterCrop(resolution)(Resize(int(round(resolution / CROP_RATIO)))(image))
    else:
        # torchvision draws the crop from torch's global generator: draw it from this row's seed instead.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2**63)))
            top, left, h, w = RandomResizedCrop.get_params(image, CROP_SCALE, (3 / 4, 4 / 3))
        image = resized_crop(image, top, left, h, w, [resolution, resolution])
        if augment == "crop_flip" and rng.random() < 0.5:
            image = hflip(image)
    return pil_to_tensor(image).float().div_(255.0)


def preprocess(batch: dict[str, np.ndarray], *, kind: str, resolution: int, channels: int, augment: str = "none",
               seed: int = 0) -> dict[str, np.ndarray]:
    """The `map_batches` function: {"image", "label", "id"[, "epoch"]} -> {"image", "label"}.

    Augments when `augment` is not "none" (training); the epoch comes from the batch's "epoch" column,
    written by the epoch ordering step (raynas.data.pipeline).
    """
    rngs = None
    if augment != "none":
        rngs = _row_rngs(seed, int(batch["epoch"][0]), batch["id"])
    if kind == "array":
        x = _array_batch(batch["image"], resolution, channels, augment, rngs)
    else:
        x = torch.stack([match_channels(_file_image(img, resolution, augment, None if rngs is None else rngs[i]),
                                        channels) for i, img in enumerate(batch["image"])])
    return {"image": x.numpy(), "label": np.asarray(batch["label"], dtype=np.int64)}


def broadcast_stats(values, channels: int) -> list[float]:
    """Per-channel statistics for `channels` channels: one value repeated, or the mean of three for gray."""
    values = [float(v) for v in values]
    if len(values) == 1:
        return values * channels
    if len(values) != channels:  # RGB statistics on a gray network: their mean
        return [sum(values) / len(values)] * channels
    return values
