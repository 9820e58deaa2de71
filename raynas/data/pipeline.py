"""Ray Data pipelines for training and evaluation, built on the driver from a `data:` config.

Training (`train_dataset`): each epoch the rows are put in a new order, fixed by (seed, epoch), then
augmented on CPU in `map_batches` with generators seeded by (seed, epoch, row id). One Dataset serves
every epoch (Ray Train splits it once and re-executes it per epoch), so the plan has to learn which
epoch it is executing: the consumers announce it on an `EpochClock` before they start iterating, and
the ordering step of that execution reads it. Because the epoch comes from the trainer (restored from
its checkpoint) rather than from a count of executions, a run resumed at epoch k, or restarted after a
worker failure, reads exactly the batches an uninterrupted run reads at epoch k. (Ray Data's own
per-execution reseeding, `RandomSeedConfig(reseed_after_execution=True)`, counts executions, and that
count starts again at 0 in a resumed run.)

The order: rows are sorted by an (seed, epoch)-keyed hash of their id within each block, then
`random_shuffle` with a fixed seed scatters the blocks' rows over the dataset. A row's place thus
changes every epoch (the positions a source block's rows land on are fixed, which of its rows lands
where is not), while the shuffle's own layout, and with it Ray Train's split, stays fixed and
deterministic.

Evaluation (`eval_dataset`): un-augmented, a fixed seeded subset when asked (BN recalibration), and
materialized once: the images sit in the object store, whichever node evaluates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raynas.data import keys
from raynas.data.config import validate_data_config
from raynas.data.sources import SPLITS, Source, holdout
from raynas.data.transforms import IMAGENET_MEAN, IMAGENET_STD, broadcast_stats, preprocess
from raynas.errors import ConfigError

CLOCK_KEY = "raynas.data.train"  # DataContext config of a training Dataset: its TrainFeedInfo
PREPROCESS_BATCH = 128  # images per preprocessing call: bounded memory even for large decoded images


# Restartable: consumers set the epoch before every epoch they read, so a restarted clock loses nothing.
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class EpochClock:
    """The epoch the consumers of a training Dataset are about to read."""

    def __init__(self):
        self.epoch: int | None = None

    def set(self, epoch: int) -> None:
        self.epoch = epoch

    def get(self) -> int | None:
        return self.epoch


@dataclass(frozen=True)
class TrainFeedInfo:
    """What a consumer of a training Dataset needs besides its rows (kept in the Dataset's DataContext)."""

    clock: Any              # EpochClock handle
    rows_per_epoch: int     # rows of each epoch (all consumers together)



def split_source(cfg: Mapping[str, Any], split: str, cpus: float = 1.0) -> Source:
    """The rows of split "train" or "val" of a validated `data:` config, capped by max_*_samples."""
    if split not in SPLITS:
        raise ConfigError(f"split: {split!r} is not allowed; allowed: {list(SPLITS)}")
    name = cfg["name"]
    if name == "digits":
        from raynas.data.embedded import digits_source

        source = holdout(digits_source(cpus), split, cfg["val_fraction"], cfg["split_seed"])
    elif name == "synthetic":
        from raynas.data.embedded import synthetic_source

        source = synthetic_source(cfg, split, cpus)
    elif name in ("cifar10", "cifar100"):
        from raynas.data.cifar import cifar_source

        source = cifar_source(cfg, split, cpus)
    elif name == "imagefolder":
        from raynas.data.imagefolder import imagefolder_source

        source = imagefolder_source(cfg, split, cpus)
    else:
        from raynas.data.parquet import parquet_source

        source = parquet_source(cfg, split, cpus)
    cap = cfg["max_train_samples"] if split == "train" else cfg["max_val_samples"]
    if cap is not None and cap < source.num_rows:
        source = source.select(cap, cfg["split_seed"], keys.CAP)
    if source.num_rows == 0:
        raise ConfigError(f"data: the {split} split of dataset '{name}' has no images")
    return source

def task_cpus(reserved: float = 0.0) -> float:
    """CPUs per Ray Data task: 1 when the cluster has a CPU beyond `reserved` (e.g. the training workers'),
    else 0, so that preprocessing shares the CPUs of the workers it feeds instead of waiting forever.
    Called in an actor (a Tune trial, an evaluator), 0: the actor holds its CPUs while it waits for its
    data, and another actor may take the last free one at any moment."""
    from raynas.hw.devices import init_local_ray

    init_local_ray()  # the cluster raynas uses (RAY_ADDRESS, or a local one) unless Ray is up already
    if ray.get_runtime_context().get_actor_id() is not None:
        return 0.0
    free = ray.available_resources().get("CPU", 0.0) - reserved
    return 1.0 if free >= 1.0 else 0.0


def normalization(cfg: Mapping[str, Any] | None, channels: int) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) that the consumer applies on its device."""
    cfg = validate_data_config(cfg, check_files=False)
    name = cfg["name"]
    if cfg["mean"] is not None:
        mean, std = cfg["mean"], cfg["std"]
    elif name == "digits":
        from raynas.data.embedded import digits_stats

        mean, std = digits_stats(cfg)
    elif name == "synthetic":
        from raynas.data.embedded import synthetic_stats

        mean, std = synthetic_stats(cfg)
    elif name in ("cifar10", "cifar100"):
        from raynas.data.cifar import CIFAR_MEAN, CIFAR_STD

        mean, std = CIFAR_MEAN[name], CIFAR_STD[name]
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return broadcast_stats(mean, channels), broadcast_stats(std, channels)


def _epoch_order(batch: dict[str, np.ndarray], clock, seed: int) -> dict[str, np.ndarray]:
    epoch = ray.get(clock.get.remote())
    if epoch is None:
        raise RuntimeError("a training Dataset was read before its EpochClock was set (see raynas.data.batches)")
    order = np.argsort(keys.row_keys(batch["id"], seed, keys.ORDER, epoch), kind="stable")
    out = {k: v[order] for k, v in batch.items()}
    out["epoch"] = np.full(len(order), epoch, dtype=np.int64)
    return out


def _preprocess_args(source: Source, resolution: int, channels: int, augment: str, seed: int) -> dict[str, Any]:
    return {"kind": source.kind, "resolution": resolution, "channels": channels, "augment": augment, "seed": seed}


def train_dataset(cfg: Mapping[str, Any] | None, resolution: int, channels: int, *, seed: int,
                  rows_per_epoch: int | None = None, cpus: float | None = None):
    """The training split as one Dataset for every epoch: reordered and augmented per epoch (see the
    module doc). `rows_per_epoch` keeps only the first rows of each epoch's order (e.g. the rows
    `steps_per_epoch` needs); read it back, with the clock, through `train_feed_info`."""
    cfg = validate_data_config(cfg)
    cpus = task_cpus() if cpus is None else cpus
    source = split_source(cfg, "train", cpus)
    rows = source.num_rows if rows_per_epoch is None else min(rows_per_epoch, source.num_rows)
    # On the driver's node: the run ends with that node anyway, while any worker node may be lost mid-run.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    clock = EpochClock.options(scheduling_strategy=here).remote()
    dataset = source.dataset.map_batches(_epoch_order, fn_kwargs={"clock": clock, "seed": seed},
                                         batch_size=None, batch_format="numpy", num_cpus=cpus)
    dataset = dataset.random_shuffle(seed=seed, num_cpus=cpus)
    if rows < source.num_rows:
        dataset = dataset.limit(rows)
    dataset = dataset.map_batches(preprocess, fn_kwargs=_preprocess_args(source, resolution, channels, cfg["augment"],
                                                                          seed),
                                  batch_size=PREPROCESS_BATCH, batch_format="numpy", num_cpus=cpus)
    dataset.context.set_config(CLOCK_KEY, TrainFeedInfo(clock, rows))
    dataset.context.execution_options.preserve_order = True  # the epoch's order, as planned
    return dataset


def train_feed_info(context) -> TrainFeedInfo:
    """The TrainFeedInfo of a training Dataset, from its DataContext (or a Ray Train shard's)."""
    info = context.get_config(CLOCK_KEY)
    if info is None:
        raise ValueError("not a training Dataset of raynas.data.train_dataset")
    return info


def eval_dataset(cfg: Mapping[str, Any] | None, split: str, resolution: int, channels: int, *,
                 num_samples: int | None = None, seed: int = 0, cpus: float | None = None):
    """Split "train" or "val", un-augmented, materialized; `num_samples` takes a fixed seeded subset
    (e.g. the BN-recalibration images)."""
    cfg = validate_data_config(cfg)
    cpus = task_cpus() if cpus is None else cpus
    source = split_source(cfg, split, cpus)
    if num_samples is not None and num_samples < source.num_rows:
        source = source.select(num_samples, seed, keys.SUBSET)
    dataset = source.dataset.map_batches(preprocess, fn_kwargs=_preprocess_args(source, resolution, channels, "none",
                                                                                 seed),
                                         batch_size=PREPROCESS_BATCH, batch_format="numpy", num_cpus=cpus)
    dataset.context.execution_options.preserve_order = True  # the same batches on every read
    return dataset.materialize()
