"""Training and evaluation data through Ray Data, on a real local Ray and tiny real files: digits,
synthetic, CIFAR pickles (and the refusal of a tampered one), ImageFolder via read_images, Parquet via
read_parquet (locally and on the S3 test server), per-epoch seeded shuffling and augmentation, Ray
Train's equal split, and the fixed evaluation subsets."""

import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raynas import storage
from raynas.data import (
    Batches,
    EpochBatches,
    Normalizer,
    dataset_num_classes,
    eval_dataset,
    normalization,
    train_dataset,
    train_feed_info,
    validate_data_config,
)
from raynas.data.cifar import load_batch
from raynas.errors import ConfigError


def _png_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _all(ds, cfg, channels=3, batch_size=1024):
    """(normalised images, labels) of an evaluation Dataset, in its order."""
    parts = list(Batches(ds, batch_size, "cpu", Normalizer(*normalization(cfg, channels))))
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def _epoch(ds, epoch, batch_size=8, cfg=None):
    batches = EpochBatches(ds, train_feed_info(ds.context), batch_size, "cpu", Normalizer([0.0], [1.0]) if cfg is None
                           else Normalizer(*normalization(cfg, 3)))
    parts = list(batches.epoch(epoch))
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


# ---- digits and synthetic -----------------------------------------------------------------------------
def test_digits_upsampled_normalised_fixed_split(ray_local):
    cfg = {"name": "digits"}
    train_x, train_y = _all(eval_dataset(cfg, "train", 16, 3), cfg)
    val_x, _ = _all(eval_dataset(cfg, "val", 16, 3), cfg)
    assert len(train_x) + len(val_x) == 1797 and len(val_x) == round(0.2 * 1797)
    assert dataset_num_classes(cfg) == 10 and set(train_y.tolist()) == set(range(10))
    assert train_x.shape[1:] == (3, 16, 16) and train_x.dtype == torch.float32
    assert torch.equal(train_x[:, 0], train_x[:, 1]) and torch.equal(train_x[:, 1], train_x[:, 2])  # gray x 3
    assert abs(train_x.mean().item()) < 0.15 and 0.5 < train_x.std().item() < 1.3  # train statistics
    # The split is the same whenever it is built (every node, every run).
    again_x, again_y = _all(eval_dataset(cfg, "train", 16, 3), cfg)
    assert torch.equal(again_x, train_x) and torch.equal(again_y, train_y)
    # Train and val are disjoint: no val image equals a train image at native size.
    t8, v8 = _all(eval_dataset(cfg, "train", 8, 1), cfg, 1)[0], _all(eval_dataset(cfg, "val", 8, 1), cfg, 1)[0]
    train_keys = {x.numpy().tobytes() for x in t8}
    assert sum(x.numpy().tobytes() in train_keys for x in v8) < 5  # sklearn digits has a few exact duplicates


def test_synthetic_is_seeded_and_learnable(ray_local):
    cfg = {"name": "synthetic", "num_samples": 64, "num_val_samples": 32, "num_classes": 4, "noise": 0.1}
    xs, ys = _all(eval_dataset(cfg, "train", 8, 3), cfg)
    again, _ = _all(eval_dataset(cfg, "train", 8, 3), cfg)
    other, _ = _all(eval_dataset({**cfg, "seed": 1}, "train", 8, 3), cfg)
    assert torch.equal(xs, again) and not torch.equal(xs, other)
    # Labels are learnable: nearest class mean on train classifies val well.
    means = torch.stack([xs.flatten(1)[ys == c].mean(0) for c in range(4)])
    vx, vy = _all(eval_dataset(cfg, "val", 8, 3), cfg)
    assert (torch.cdist(vx.flatten(1), means).argmin(1) == vy).float().mean().item() > 0.9


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
        with open(directory / f, "wb") as fh:  # as the official files: protocol 2, bytes keys
            pickle.dump({b"data": data, key: labels, b"batch_label": f.encode(),
                         b"filenames": [f"{i}.png".encode() for i in range(n_per_file)]}, fh, protocol=2)
        written[f] = (data, labels)
    return written


def test_cifar10_pickles(ray_local, tmp_path):
    written = _write_cifar(tmp_path / "c10", "cifar10", 4, 10)
    cfg = {"name": "cifar10", "root": str(tmp_path / "c10"), "augment": "none"}
    train_x, _ = _all(eval_dataset(cfg, "train", 32, 3), cfg)
    val_x, val_y = _all(eval_dataset(cfg, "val", 32, 3), cfg)
    assert len(train_x) == 20 and len(val_x) == 4 and dataset_num_classes(cfg) == 10
    data, labels = written["test_batch"]
    expected = torch.from_numpy(data[1].reshape(3, 32, 32)).float() / 255
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    assert val_y.tolist() == labels
    torch.testing.assert_close(val_x[1], (expected - mean) / std)
    assert _all(eval_dataset(cfg, "train", 16, 3), cfg)[0].shape[1:] == (3, 16, 16)


def test_cifar100_parent_directory_and_missing_file(ray_local, tmp_path):
    _write_cifar(tmp_path / "cifar-100-python", "cifar100", 6, 100)
    cfg = {"name": "cifar100", "root": str(tmp_path)}
    assert eval_dataset(cfg, "train", 32, 3).count() == 6 and dataset_num_classes(cfg) == 100
    (tmp_path / "cifar-100-python" / "test").unlink()
    with pytest.raises(ConfigError, match=r"data\.root: .*missing"):
        eval_dataset(cfg, "val", 32, 3)


class _RunsCode:
    """What a tampered pickle looks like: unpickling it would call os.system."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_tampered_cifar_batch_is_refused_and_never_runs(ray_local, tmp_path):
    _write_cifar(tmp_path / "c10", "cifar10", 2, 10)
    marker = tmp_path / "pwned"
    batch = tmp_path / "c10" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": _RunsCode(f"touch {marker}"), b"labels": [0, 1]}, protocol=2))
    cfg = {"name": "cifar10", "root": str(tmp_path / "c10")}
    with pytest.raises(ConfigError) as info:
        eval_dataset(cfg, "train", 32, 3)
    message = str(info.value)
    assert "\n" not in message and str(batch) in message and f"'{os.system.__module__}.system'" in message
    assert "refused" in message and not marker.exists()
    # A genuine batch in the official format loads, arrays and lists intact.
    genuine = load_batch(str(tmp_path / "c10" / "test_batch"))
    assert genuine[b"data"].shape == (2, 3072) and genuine[b"data"].dtype == np.uint8
    assert genuine[b"filenames"] == [b"0.png", b"1.png"] and len(genuine[b"labels"]) == 2


# ---- ImageFolder (read_images) and Parquet (read_parquet) -------------------------------------------------
COLOURS = {"cat": (200, 10, 10), "dog": (10, 200, 10), "emu": (10, 10, 200)}


def test_imagefolder_through_read_images_with_and_without_splits(ray_local, tmp_path):
    for split in ("train", "val"):
        for cls, colour in COLOURS.items():
            (tmp_path / "tree" / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((10, 12 + i, 3), colour, dtype=np.uint8)).save(
                    tmp_path / "tree" / split / cls / f"{i}.png")
    (tmp_path / "tree" / "train" / "cat" / "notes.txt").write_text("not an image")
    cfg = {"name": "imagefolder", "root": str(tmp_path / "tree"), "mean": [0.0], "std": [1.0]}
    assert dataset_num_classes(cfg) == 3
    x, y = _all(eval_dataset(cfg, "train", 16, 3), cfg)
    assert x.shape == (6, 3, 16, 16) and sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]
    # Labels are the sorted folder names: each image's colour is its class's.
    for image, label in zip(x, y):
        dominant = int(image.mean((1, 2)).argmax())
        assert dominant == label.item()
    flat = {"name": "imagefolder", "root": str(tmp_path / "tree" / "train"), "val_fraction": 0.5}
    assert eval_dataset(flat, "train", 8, 3).count() == 3 and eval_dataset(flat, "val", 8, 3).count() == 3


def test_parquet_bytes_and_arrays(ray_local, tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(10)]
    labels = [i % 3 for i in range(10)]
    pq.write_table(pa.table({"image": [_png_bytes(a) for a in images], "label": labels}), tmp_path / "png.parquet")
    cfg = {"name": "parquet", "path": str(tmp_path / "png.parquet"), "val_fraction": 0.3}
    x, _ = _all(eval_dataset(cfg, "train", 16, 3), cfg)
    assert x.shape == (7, 3, 16, 16) and dataset_num_classes(cfg) == 3
    assert eval_dataset(cfg, "val", 16, 3).count() == 3

    flat = [a.reshape(-1).tolist() for a in images]
    pq.write_table(pa.table({"pixels": flat, "y": labels, "tag": [str(v) for v in labels]}),
                   tmp_path / "arr.parquet")
    pq.write_table(pa.table({"pixels": flat[:4], "y": labels[:4]}), tmp_path / "arr_val.parquet")
    cfg = {"name": "parquet", "path": str(tmp_path / "arr.parquet"), "val_path": str(tmp_path / "arr_val.parquet"),
           "image_column": "pixels", "label_column": "y", "mean": [0.0], "std": [1.0], "num_classes": 5}
    x, y = _all(eval_dataset(cfg, "train", 8, 3), cfg)
    assert len(x) == 10 and eval_dataset(cfg, "val", 8, 3).count() == 4 and dataset_num_classes(cfg) == 5
    assert y.tolist() == labels
    torch.testing.assert_close(x[2, 0], torch.from_numpy(images[2]).float() / 255)

    with pytest.raises(ConfigError, match="data.label_column"):
        eval_dataset({**cfg, "label_column": "tag"}, "train", 8, 3)
    with pytest.raises(ConfigError, match="data.label_column: must differ"):
        eval_dataset({**cfg, "label_column": "pixels"}, "train", 8, 3)


def test_parquet_and_imagefolder_read_from_object_storage(ray_s3, s3_bucket, tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (12, 3, 4, 4), dtype=np.uint8)
    table = pa.table({"image": [a.reshape(-1).tolist() for a in images], "label": [i % 2 for i in range(12)]})
    storage.write_table(storage.join(s3_bucket, "data", "train.parquet"), table)
    cfg = {"name": "parquet", "path": storage.join(s3_bucket, "data", "train.parquet"), "image_shape": [3, 4, 4],
           "mean": [0.0], "std": [1.0], "val_fraction": 0.25}
    x, _ = _all(eval_dataset(cfg, "train", 4, 3), cfg)
    assert len(x) == 9 and dataset_num_classes(cfg) == 2
    assert {a.tobytes() for a in (x * 255).round().to(torch.uint8).numpy()} <= {a.tobytes() for a in images}
    for cls in ("a", "b"):
        storage.write_bytes(storage.join(s3_bucket, "tree", cls, "0.png"), _png_bytes(images[0].transpose(1, 2, 0)))
    tree = {"name": "imagefolder", "root": storage.join(s3_bucket, "tree"), "val_fraction": 0.5}
    assert dataset_num_classes(tree) == 2 and eval_dataset(tree, "val", 8, 3).count() == 1
    with pytest.raises(ConfigError, match=r"data\.root: directory s3://.*/nothing does not exist"):
        validate_data_config({"name": "imagefolder", "root": storage.join(s3_bucket, "nothing")})


# ---- training order, augmentation, Ray Train's split, evaluation subsets ---------------------------------------
def test_epoch_order_is_seeded_per_epoch_and_replayed_on_resume(ray_local):
    cfg = {"name": "synthetic", "num_samples": 48, "image_size": 4}
    ds = train_dataset(cfg, 4, 3, seed=3)
    e0, y0 = _epoch(ds, 0)
    e1, _ = _epoch(ds, 1)
    assert len(e0) == len(e1) == 48
    keys0 = [x.numpy().tobytes() for x in e0]
    keys1 = [x.numpy().tobytes() for x in e1]
    assert sorted(keys0) == sorted(keys1) and keys0 != keys1  # the same images, in another order
    assert torch.equal(_epoch(ds, 0)[0], e0)  # epoch 0 again: the same batches
    # A resumed run builds its Dataset anew and starts at epoch 1: it reads what epoch 1 read here.
    resumed = train_dataset(cfg, 4, 3, seed=3)
    assert torch.equal(_epoch(resumed, 1)[0], e1)
    assert not torch.equal(_epoch(train_dataset(cfg, 4, 3, seed=4), 0)[0], e0)  # the seed decides
    # Natural order is not one of them, and limiting an epoch keeps its first rows' order.
    natural, _ = _all(eval_dataset(cfg, "train", 4, 3), {"name": "synthetic", "mean": [0.0], "std": [1.0]})
    assert [x.numpy().tobytes() for x in natural] != keys0
    limited = train_dataset(cfg, 4, 3, seed=3, rows_per_epoch=16)
    assert train_feed_info(limited.context).rows_per_epoch == 16 and len(_epoch(limited, 0)[0]) == 16
    assert y0.dtype == torch.int64


def test_augmentation_runs_on_cpu_in_map_batches_and_is_seeded_per_epoch(ray_local, tmp_path):
    _write_cifar(tmp_path / "c10", "cifar10", 4, 10)
    cfg = {"name": "cifar10", "root": str(tmp_path / "c10"), "augment": "crop_flip"}
    ds = train_dataset(cfg, 32, 3, seed=0)
    a0, _ = _epoch(ds, 0, cfg=cfg)
    assert torch.equal(a0, _epoch(train_dataset(cfg, 32, 3, seed=0), 0, cfg=cfg)[0])  # same seed, epoch: same
    # Augmented: not the plain images; padding zeros (black, normalised) appear at crop borders.
    plain, _ = _all(eval_dataset(cfg, "train", 32, 3), cfg)
    plain_keys = {x.numpy().tobytes() for x in plain}
    assert sum(x.numpy().tobytes() in plain_keys for x in a0) < len(a0) // 2
    # A new epoch draws new crops (the image order changes too; compare as sets).
    a1, _ = _epoch(ds, 1, cfg=cfg)
    assert {x.numpy().tobytes() for x in a0} != {x.numpy().tobytes() for x in a1}
    # The augmentation is a Ray Data map_batches step, executed by Ray tasks, not by the consumer.
    assert "MapBatches(preprocess)" in ds.stats()


def test_two_workers_read_disjoint_equal_shards_covering_each_epoch(ray_local, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raynas.data import trainer_datasets

    data = validate_data_config({"name": "synthetic", "num_samples": 40, "num_val_samples": 12, "image_size": 4,
                                 "batch_size": 5, "eval_batch_size": 6})
    cfg = {"data": data, "eval": {"bn_samples": 8, "seed": 0}, "scaling": {"num_workers": 2, "cpus_per_worker": 1},
           "steps_per_epoch": None, "seed": 7}

    def loop(config):
        import ray.train

        from raynas.data import WorkerData

        rank = ray.train.get_context().get_world_rank()
        worker = WorkerData.from_shards(config["data"], 3, torch.device("cpu"), 2)
        seen = {"steps": worker.train.steps,
                "epochs": [[x.numpy().tobytes().hex() for xb, _ in worker.train.epoch(e) for x in xb] for e in (0, 1)],
                "bn": [x.numpy().tobytes().hex() for xb, _ in worker.bn for x in xb],
                "val": [y for _, yb in worker.val for y in yb.tolist()]}
        with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
            json.dump(seen, f)

    TorchTrainer(loop, train_loop_config={"data": data, "out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(name="split", storage_path=str(tmp_path / "runs")),
                 **trainer_datasets(cfg, 4, 3)).fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4  # 40 images, 2 workers, batches of 5
    for epoch in (0, 1):
        a, b = (set(r["epochs"][epoch]) for r in ranks)
        assert len(a) == len(b) == 20 and not a & b and len(a | b) == 40  # disjoint, equal, the whole epoch
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]  # a new order each epoch
    # Every worker calibrates and validates on the same whole sets.
    assert ranks[0]["bn"] == ranks[1]["bn"] and len(ranks[0]["bn"]) == 8
    assert ranks[0]["val"] == ranks[1]["val"] and len(ranks[0]["val"]) == 12


def test_evaluation_subset_is_fixed_by_its_seed(ray_local):
    cfg = {"name": "digits", "mean": [0.0], "std": [1.0]}
    first, _ = _all(eval_dataset(cfg, "train", 8, 1, num_samples=64, seed=5), cfg, 1)
    again, _ = _all(eval_dataset(cfg, "train", 8, 1, num_samples=64, seed=5), cfg, 1)
    other, _ = _all(eval_dataset(cfg, "train", 8, 1, num_samples=64, seed=6), cfg, 1)
    train, _ = _all(eval_dataset(cfg, "train", 8, 1), cfg, 1)
    assert len(first) == 64 and torch.equal(first, again) and not torch.equal(first, other)
    train_keys = [x.numpy().tobytes() for x in train]
    assert all(x.numpy().tobytes() in train_keys for x in first)  # drawn from the (un-augmented) train split


# ---- config errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, field", [
    ({"name": "mnist"}, "data.name"),
    ({"name": "digits", "root": "x"}, "data.root: unknown field"),
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
