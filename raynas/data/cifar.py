"""CIFAR-10/100 in the python-pickle directory format of the official tarballs.

cifar10: data_batch_1..5 + test_batch (key b"labels"); cifar100: train + test (key b"fine_labels").
`root` (a local path or a URI) may be that directory or its parent (holding cifar-10-batches-py /
cifar-100-python). The batches are pickles, and a pickle can name any Python function to call: they
are read with an unpickler that admits only what a CIFAR batch holds (numpy arrays, and dicts and lists,
which need no global), so a tampered file is refused instead of run.
"""

from __future__ import annotations

import _codecs
import io
import pickle
from typing import Any

import numpy as np

from raynas import storage
from raynas.data.sources import Source, from_arrays
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


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct as fn  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct as fn
    return fn


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1"); no other codec.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return _codecs.encode(text, encoding)


class CifarUnpickler(pickle.Unpickler):
    """Resolves only the globals a CIFAR batch needs; any other is refused (never imported or called)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("_codecs", "encode"): lambda: _latin1_encode,
    }

    def __init__(self, file, location: str):
        super().__init__(file, encoding="bytes")
        self.location = location

    def find_class(self, module: str, name: str) -> Any:
        factory = self.ALLOWED.get((module, name))
        if factory is None:
            raise ConfigError(f"data.root: {storage.display(self.location)} is not a CIFAR batch: it asks to load "
                              f"'{module}.{name}', which is refused (a CIFAR batch holds only numpy arrays and lists)")
        return factory()


def load_batch(location: str) -> dict:
    """One CIFAR batch file as its dict (bytes keys), read through raynas.storage."""
    data = storage.read_bytes(location, "data.root")
    try:
        batch = CifarUnpickler(io.BytesIO(data), location).load()
    except ConfigError:
        raise
    except Exception as exc:  # truncated or foreign files: any unpickling failure is bad input
        raise ConfigError(f"data.root: {storage.display(location)} is not a readable CIFAR batch "
                          f"({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(batch, dict):
        raise ConfigError(f"data.root: {storage.display(location)} is not a CIFAR batch (no dict inside)")
    return batch


def cifar_dir(name: str, root: str) -> str:
    """The directory holding the pickles, or a ConfigError naming the missing file."""
    files = [f for split_files in FILES[name].values() for f in split_files]
    for candidate in (root, storage.join(root, SUBDIR[name])):
        if all(storage.is_file(storage.join(candidate, f)) for f in files):
            return candidate
    missing = [f for f in files if not storage.is_file(storage.join(root, f))]
    raise ConfigError(f"data.root: {storage.display(root)} is not a {name} python-pickle directory "
                      f"(missing {missing[0]}; expected files {files})")


def _read_batch(location: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = load_batch(location)
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"data.root: {storage.display(location)} is not a CIFAR batch ({exc!r})") from None
    return data, labels


def cifar_source(cfg: dict[str, Any], split: str, cpus: float) -> Source:
    name = cfg["name"]
    directory = cifar_dir(name, cfg["root"])
    parts = [_read_batch(storage.join(directory, f), LABEL_KEY[name]) for f in FILES[name][split]]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES[name]):
        raise ConfigError(f"data.root: {storage.display(directory)} has labels outside 0..{NUM_CLASSES[name] - 1}")
    return from_arrays(images, labels, cpus)
