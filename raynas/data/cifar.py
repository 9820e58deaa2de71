"""CIFAR-10/100 in the python-pickle directory format of the official tarballs.

cifar10: data_batch_1..5 + test_batch (key b"labels"); cifar100: train + test (key b"fine_labels").
`root` may be that directory or its parent (holding cifar-10-batches-py / cifar-100-python).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raynas.data.images import ImageTensorDataset
from raynas.errors import ConfigError

CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}
FILES = {
    "cifar10": {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"]},
    "cifar100": {"train": ["train"], "val": ["test"]},
}
SUBDIR = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
LABEL_KEY = {"cifar10": b"labels", "cifar100": b"fine_labels"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


def cifar_dir(name: str, root: str | Path) -> Path:
    """The directory holding the pickles, or a ConfigError naming the missing file."""
    root = Path(root)
    for candidate in (root, root / SUBDIR[name]):
        if all((candidate / f).is_file() for files in FILES[name].values() for f in files):
            return candidate
    missing = [f for files in FILES[name].values() for f in files if not (root / f).is_file()]
    raise ConfigError(f"data.root: {root} is not a {name} python-pickle directory "
                      f"(missing {missing[0]}; expected files {sum(FILES[name].values(), [])})")


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    # The official files are pickles of plain dicts of numpy arrays and lists (bytes keys).
    with path.open("rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return data, np.asarray(batch[label_key], dtype=np.int64)


def cifar_dataset(cfg: dict[str, Any], split: str, resolution: int, channels: int,
                  augment: str) -> ImageTensorDataset:
    name = cfg["name"]
    directory = cifar_dir(name, cfg["root"])
    parts = [_read_batch(directory / f, LABEL_KEY[name]) for f in FILES[name][split]]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES[name]):
        raise ConfigError(f"data.root: {directory} has labels outside 0..{NUM_CLASSES[name] - 1}")
    return ImageTensorDataset(images, labels, resolution=resolution, channels=channels,
                              mean=cfg["mean"] or CIFAR_MEAN[name], std=cfg["std"] or CIFAR_STD[name],
                              augment=augment, num_classes=NUM_CLASSES[name])
