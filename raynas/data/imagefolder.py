"""ImageFolder trees, read with `ray.data.read_images`: `root/<class>/<image>` (split by the fixed
hold-out) or `root/train/<class>/...` + `root/val/<class>/...`. Classes are the folder names, sorted;
`root` is a local path or a URI (the files are listed through raynas.storage and read by Ray Data on
whichever node runs the read)."""

from __future__ import annotations

import posixpath
from typing import Any

import numpy as np

from raynas import storage
from raynas.data import keys
from raynas.data.sources import Source, holdout
from raynas.errors import ConfigError

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "tif", "tiff", "bmp", "gif", "webp")


def _has_splits(root: str) -> bool:
    return storage.is_dir(storage.join(root, "train")) and storage.is_dir(storage.join(root, "val"))


def _classes(base: str) -> list[str]:
    return [name for name in storage.list_dir(base)
            if not name.startswith(".") and storage.is_dir(storage.join(base, name))]


def imagefolder_num_classes(root: str) -> int:
    return len(_classes(storage.join(root, "train") if _has_splits(root) else root))


def _files(base: str) -> tuple[list[str], list[str]]:
    """(classes, image locations), sorted by class then file name (torchvision's order)."""
    classes = _classes(base)
    files = [location for cls in classes for location in storage.list_files(storage.join(base, cls))
             if location.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]
    if not files:
        raise ConfigError(f"data.root: {storage.display(base)} is not an image folder tree (no images in "
                          f"class folders; expected {storage.display(base)}/<class>/<image>)")
    return classes, files


def _label_and_id(batch: dict[str, np.ndarray], base: str, classes: dict[str, int]) -> dict[str, np.ndarray]:
    # Ray Data gives each row the path it read (within the file system): its folder is its class.
    rel = [posixpath.relpath(p, base) for p in batch["path"]]
    return {"image": batch["image"],
            "label": np.array([classes[posixpath.basename(posixpath.dirname(r))] for r in rel], dtype=np.int64),
            "id": np.array([keys.text_id(r) for r in rel], dtype=np.int64)}


def imagefolder_source(cfg: dict[str, Any], split: str, cpus: float) -> Source:
    import ray.data

    root = cfg["root"]
    has_splits = _has_splits(root)
    base = storage.join(root, split) if has_splits else root
    classes, files = _files(base)
    fs, base_path = storage.resolve(base)
    paths = [storage.resolve(f)[1] for f in files]
    ids = np.array([keys.text_id(posixpath.relpath(p, base_path)) for p in paths], dtype=np.int64)
    dataset = ray.data.read_images(paths, filesystem=fs, include_paths=True, mode="RGB",
                                   override_num_blocks=max(1, min(len(paths) // 256, 64)),
                                   num_cpus=cpus)
    dataset = dataset.map_batches(_label_and_id, fn_kwargs={"base": base_path,
                                                            "classes": {c: i for i, c in enumerate(classes)}},
                                  batch_format="numpy", num_cpus=cpus)
    source = Source(dataset, ids, "file", cpus)
    return source if has_splits else holdout(source, split, cfg["val_fraction"], cfg["split_seed"])
