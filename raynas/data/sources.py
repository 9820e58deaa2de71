"""The rows of a dataset split as a Ray Dataset: {"image", "label", "id"}, images at native size.

Each source module reads its own format (embedded arrays, CIFAR pickles, an ImageFolder tree through
`ray.data.read_images`, Parquet through `ray.data.read_parquet`); this module adds what they share:
the fixed hold-out split where the source has no validation split, the size caps, and seeded subsets.
A row's `id` is stable (an index into embedded arrays, a hash of a file's path or of a Parquet row), and
every selection is a hash of it (raynas.data.keys), so a split is the same on every node and every run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from raynas.data import keys
from raynas.errors import ConfigError

SPLITS = ("train", "val")
ROWS_PER_BLOCK = 1024  # embedded arrays: rows per Ray Data block (a fixed layout, whatever the cluster)


@dataclass(frozen=True)
class Source:
    dataset: Any          # ray.data.Dataset of {"image", "label", "id"}
    ids: np.ndarray       # the id of every row (known without reading images, except for Parquet)
    kind: str             # "array" (CHW arrays at native size) or "file" (encoded/decoded image files)
    cpus: float = 1.0     # CPUs each Ray Data task of this source's pipeline asks for

    @property
    def num_rows(self) -> int:
        return len(self.ids)

    def select(self, n: int, *salt: int, complement: bool = False) -> Source:
        """The rows whose ids have the `n` smallest keys for `salt` (or all the others)."""
        _, threshold = keys.smallest(self.ids, n, *salt)
        mask = keys.in_subset(self.ids, threshold, *salt) != complement
        dataset = self.dataset.map_batches(_keep, fn_kwargs={"threshold": threshold, "salt": salt,
                                                             "complement": complement},
                                           batch_format="numpy", num_cpus=self.cpus)
        return replace(self, dataset=dataset, ids=self.ids[mask])


def _keep(batch: dict[str, np.ndarray], threshold: int, salt: tuple[int, ...], complement: bool):
    mask = keys.in_subset(batch["id"], threshold, *salt) != complement
    return {k: v[mask] for k, v in batch.items()}


def from_arrays(images: np.ndarray, labels: np.ndarray, cpus: float, ids: np.ndarray | None = None) -> Source:
    """Embedded N x C x H x W arrays as a Dataset, in blocks of a fixed size. `from_items` builds the
    blocks here, without Ray tasks: it works in an actor even when every CPU of the cluster is held."""
    import ray.data

    ids = np.arange(len(labels), dtype=np.int64) if ids is None else ids
    rows = [{"image": image, "label": int(label), "id": int(i)} for image, label, i in zip(images, labels, ids)]
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // ROWS_PER_BLOCK)))
    return Source(dataset, ids, "array", cpus)


def holdout(source: Source, split: str, val_fraction: float, seed: int) -> Source:
    """A fixed train/val split of a source without one: round(n * val_fraction) rows (at least 1) go to val."""
    n = source.num_rows
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise ConfigError(f"data.val_fraction: {val_fraction} leaves no training images out of {n}")
    return source.select(n_val, seed, keys.HOLDOUT, complement=split == "train")
