"""Dataset builders on tiny real files: digits, synthetic, CIFAR pickles, ImageFolder, Parquet."""

import io
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raynas.data import build_dataset, dataset_num_classes, shard_loader, validate_data_config
from raynas.errors import ConfigError


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# ---- digits and synthetic -----------------------------------------------------------------------------
def test_digits_upsampled_normalised_fixed_split():
    train = build_dataset({"name": "digits"}, "train", 16)
    val = build_dataset({"name": "digits"}, "val", 16)
    assert len(train) + len(val) == 1797 and len(val) == round(0.2 * 1797)
    assert train.num_classes == 10
    x, y = train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= y < 10
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # gray repeated to 3 channels
    stack = torch.stack([train[i][0] for i in range(300)])
    assert abs(stack.mean().item()) < 0.15 and 0.5 < stack.std().item() < 1.3
    # The split is the same whenever it is built (every rank, every run).
    again = build_dataset({"name": "digits"}, "train", 16)
    assert torch.equal(again[5][0], train[5][0]) and again[5][1] == train[5][1]
    # Train and val are disjoint: no val image equals a train image at native size.
    t8 = build_dataset({"name": "digits"}, "train", 8)
    v8 = build_dataset({"name": "digits"}, "val", 8)
    train_keys = {t8.images[i].numpy().tobytes() for i in range(len(t8))}
    overlap = sum(v8.images[i].numpy().tobytes() in train_keys for i in range(len(v8)))
    assert overlap < 5  # sklearn digits has a handful of exact duplicate images; nothing more


def test_synthetic_is_seeded_and_learnable():
    cfg = {"name": "synthetic", "num_samples": 64, "num_val_samples": 32, "num_classes": 4, "noise": 0.1}
    a = build_dataset(cfg, "train", 8)
    b = build_dataset(cfg, "train", 8)
    assert torch.equal(a[3][0], b[3][0]) and a[3][1] == b[3][1]
    assert not torch.equal(build_dataset({**cfg, "seed": 1}, "train", 8)[3][0], a[3][0])
    # Labels are learnable: nearest class mean on train classifies val well.
    xs = torch.stack([a[i][0] for i in range(len(a))]).flatten(1)
    ys = torch.tensor([a[i][1] for i in range(len(a))])
    means = torch.stack([xs[ys == c].mean(0) for c in range(4)])
    val = build_dataset(cfg, "val", 8)
    vx = torch.stack([val[i][0] for i in range(len(val))]).flatten(1)
    vy = torch.tensor([val[i][1] for i in range(len(val))])
    acc = (torch.cdist(vx, means).argmin(1) == vy).float().mean().item()
    assert acc > 0.9


# ---- CIFAR python-pickle directories ------------------------------------------------------------------
def _write_cifar(directory, name, n_per_file, num_classes):
    directory.mkdir(parents=True)
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if name == "cifar10" else ["train", "test"]
    key = b"labels" if name == "cifar10" else b"fine_labels"
    rng = np.random.default_rng(0)
    written = {}
    for f in files:
        data = rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, num_classes, n_per_file).tolist()
        with open(directory / f, "wb") as fh:
            pickle.dump({b"data": data, key: labels, b"batch_label": f.encode()}, fh)
        written[f] = (data, labels)
    return written


def test_cifar10_pickles(tmp_path):
    written = _write_cifar(tmp_path / "c10", "cifar10", 4, 10)
    cfg = {"name": "cifar10", "root": str(tmp_path / "c10"), "augment": "none"}
    train, val = build_dataset(cfg, "train", 32), build_dataset(cfg, "val", 32)
    assert len(train) == 20 and len(val) == 4 and dataset_num_classes(cfg) == 10
    x, y = val[1]
    data, labels = written["test_batch"]
    expected = torch.from_numpy(data[1].reshape(3, 32, 32)).float() / 255
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    assert y == labels[1]
    torch.testing.assert_close(x, (expected - mean) / std)
    assert build_dataset(cfg, "train", 16)[0][0].shape == (3, 16, 16)


def test_cifar100_parent_directory_and_missing_file(tmp_path):
    _write_cifar(tmp_path / "cifar-100-python", "cifar100", 6, 100)
    cfg = {"name": "cifar100", "root": str(tmp_path)}
    assert len(build_dataset(cfg, "train", 32)) == 6 and dataset_num_classes(cfg) == 100
    (tmp_path / "cifar-100-python" / "test").unlink()
    with pytest.raises(ConfigError, match=r"data\.root: .*missing"):
        build_dataset(cfg, "val", 32)


# ---- ImageFolder and Parquet ------------------------------------------------------------------------------
def test_imagefolder_with_and_without_splits(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog", "emu"):
            (tmp_path / "tree" / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(
                    tmp_path / "tree" / split / cls / f"{i}.png")
    cfg = {"name": "imagefolder", "root": str(tmp_path / "tree")}
    train = build_dataset(cfg, "train", 16)
    assert len(train) == 6 and train.num_classes == 3 and dataset_num_classes(cfg) == 3
    assert train[0][0].shape == (3, 16, 16) and train[0][1] == 0
    flat = {"name": "imagefolder", "root": str(tmp_path / "tree" / "train"), "val_fraction": 0.5}
    tr, va = build_dataset(flat, "train", 8), build_dataset(flat, "val", 8)
    assert len(tr) + len(va) == 6 and len(va) == 3


def test_parquet_bytes_and_arrays(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(10)]
    labels = [i % 3 for i in range(10)]
    pq.write_table(pa.table({"image": [_png_bytes(a) for a in images], "label": labels}), tmp_path / "png.parquet")
    cfg = {"name": "parquet", "path": str(tmp_path / "png.parquet"), "val_fraction": 0.3}
    train = build_dataset(cfg, "train", 16)
    assert len(train) == 7 and train.num_classes == 3 and train[0][0].shape == (3, 16, 16)

    flat = [a.reshape(-1).tolist() for a in images]
    pq.write_table(pa.table({"pixels": flat, "y": labels, "tag": [str(v) for v in labels]}),
                   tmp_path / "arr.parquet")
    pq.write_table(pa.table({"pixels": flat[:4], "y": labels[:4]}), tmp_path / "arr_val.parquet")
    cfg = {"name": "parquet", "path": str(tmp_path / "arr.parquet"), "val_path": str(tmp_path / "arr_val.parquet"),
           "image_column": "pixels", "label_column": "y", "mean": [0.0], "std": [1.0], "num_classes": 5}
    train, val = build_dataset(cfg, "train", 8), build_dataset(cfg, "val", 8)
    assert len(train) == 10 and len(val) == 4 and train.num_classes == 5
    x, y = train[2]
    assert y == labels[2]
    torch.testing.assert_close(x[0], torch.from_numpy(images[2]).float() / 255)

    with pytest.raises(ConfigError, match="data.label_column"):
        build_dataset({**cfg, "label_column": "tag"}, "train", 8)
    with pytest.raises(ConfigError, match="data.label_column: must differ"):
        build_dataset({**cfg, "label_column": "pixels"}, "train", 8)


# ---- sharding and config errors --------------------------------------------------------------------------
def test_shards_are_disjoint_and_cover_the_set():
    data = build_dataset({"name": "synthetic", "num_samples": 40}, "train", 4)
    seen = []
    for rank in range(2):
        loader = shard_loader(data, 5, rank=rank, world_size=2, shuffle=True, seed=3, drop_last=True)
        loader.sampler.set_epoch(1)
        seen.append(list(loader.sampler))
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 40


@pytest.mark.parametrize("cfg, field", [
    ({"name": "mnist"}, "data.name"),
    ({"name": "digits", "root": "x"}, "data: unknown field 'root'"),
    ({"batch_size": 0}, "data.batch_size"),
    ({"val_fraction": 1.5}, "data.val_fraction"),
    ({"augment": "mixup"}, "data.augment"),
    ({"name": "cifar10"}, "data.root: missing"),
    ({"name": "cifar10", "root": "/nonexistent/dir"}, "data.root"),
    ({"name": "parquet", "path": "/nonexistent.parquet"}, "data.path"),
    ({"name": "synthetic", "channels": 2}, "data.channels"),
    ({"mean": [0.5]}, "data.mean/std"),
])
def test_data_config_errors_name_the_field(cfg, field):
    with pytest.raises(ConfigError) as info:
        validate_data_config(cfg)
    message = str(info.value)
    assert field in message and "\n" not in message
