"""The driver side of supernet training: validate, locate the run, launch TorchTrainer, collect.

`train(config)` is what `raynas train` and `pipelines/train_supernet.py` call. Everything that can
be checked without compute (config, space, strategy/space fit, supernet options, data paths, that
the storage path is writable, resume consistency, cluster resources) is checked here before any
worker starts.

The run lives at `<storage_path>/<name>`, a local path or a URI (s3://bucket/runs/name): Ray Train
keeps its checkpoints there (RunConfig storage_path + storage_filesystem), the workers add
metrics.parquet and supernet.pt through raynas.storage, and a re-run with the same storage path and
name resumes from there, from any node, in any working directory.
"""

from __future__ import annotations

import posixpath
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from raynas import storage
from raynas.errors import ConfigError, UserError
from raynas.space import SearchSpace
from raynas.train.checkpointing import find_latest_checkpoint, read_meta
from raynas.train.config import validate_train_config
from raynas.train.metrics import metrics_location, read_metrics

SUPERNET_FILE = "supernet.pt"
CONFIG_FILE = "config.yaml"


@dataclass
class RunPlan:
    cfg: dict[str, Any]
    space: SearchSpace
    num_classes: int
    run_dir: str              # location: a local path or a URI
    resume_dir: str | None    # latest complete checkpoint already in the run directory
    resume_epoch: int


@dataclass
class TrainResult:
    """Where the run's artifacts are: location strings (local paths or URIs) for raynas.storage."""
    run_dir: str
    supernet_path: str
    metrics_path: str
    checkpoint_dir: str | None
    epochs: int

    def metrics(self):
        return read_metrics(self.run_dir)


def plan_run(cfg: Mapping[str, Any]) -> RunPlan:
    """Validate everything checkable without compute; `cfg` may be raw or already validated."""
    from raynas.data import dataset_num_classes
    from raynas.space import load_space
    from raynas.supernets import build_supernet
    from raynas.train.strategies import check_strategy

    cfg = validate_train_config(cfg)
    if cfg["name"] is None:
        raise ConfigError("name: missing (give the run a name, e.g. --name)")
    num_classes = dataset_num_classes(cfg["data"])
    space = load_space(cfg["space"], resolution=cfg["resolution"], num_classes=num_classes)
    check_strategy(cfg["strategy"], space)
    try:
        build_supernet(space, **cfg["supernet"])
    except (TypeError, UserError) as exc:  # e.g. an option the family's builder does not take
        raise ConfigError(f"supernet: {exc}") from None
    storage.check_writable(cfg["storage_path"], "storage_path")
    run_dir = storage.join(cfg["storage_path"], cfg["name"])
    resume_dir = find_latest_checkpoint(run_dir)
    resume_epoch = 0
    if resume_dir is not None:
        meta = read_meta(resume_dir)
        if meta["space"] != space.name:
            raise ConfigError(f"name: run '{cfg['name']}' in {storage.display(cfg['storage_path'])} trained space "
                              f"'{meta['space']}', not '{space.name}'; choose another --name")
        resume_epoch = meta["epoch"]
    return RunPlan(cfg, space, num_classes, run_dir, resume_dir, resume_epoch)


def _ensure_ray(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> None:
    """Connect to the cluster (RAY_ADDRESS, e.g. under `ray job submit`) or start a fresh local one; check
    that a local one can host the workers, since Ray Train would otherwise wait for resources forever."""
    import ray

    from raynas.hw.devices import init_local_ray

    if not init_local_ray(log_to_driver=True):
        return
    if len(ray.nodes()) == 1:  # a lone node: no autoscaler will bring more resources
        resources = ray.cluster_resources()
        if use_gpu and resources.get("GPU", 0) < num_workers:
            raise ConfigError(f"scaling.use_gpu: {num_workers} workers need {num_workers} GPUs; "
                              f"this Ray cluster has {int(resources.get('GPU', 0))}")
        if resources.get("CPU", 0) < num_workers * cpus_per_worker:
            raise ConfigError(f"scaling.num_workers: {num_workers} workers x {cpus_per_worker} CPUs exceed the "
                              f"{resources.get('CPU', 0):g} CPUs of this Ray cluster")


def _user_error_of(exc: BaseException) -> UserError | None:
    """A raynas UserError raised inside a worker, if that is what failed the run."""
    failures = list(getattr(exc, "worker_failures", {}).values())
    for failure in failures:
        seen = 0
        while failure is not None and seen < 10:
            if isinstance(failure, UserError):
                return failure
            failure = getattr(failure, "cause", None) or failure.__cause__
            seen += 1
    return None


def build_trainer(plan: RunPlan, *, plugins: Sequence[str] = (), callbacks: Sequence[Any] = ()):
    """The run's `TorchTrainer`: workers, storage, failure and checkpoint policy. Shared by `train` and
    the Tune trials, so both keep runs the same way."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raynas.data.ray_train import trainer_datasets
    from raynas.train.loop import train_loop_per_worker

    cfg = plan.cfg
    scaling = cfg["scaling"]
    resources = {"CPU": scaling["cpus_per_worker"]}
    if scaling["use_gpu"]:
        resources["GPU"] = 1
    # Ray writes the checkpoints into the same store raynas reads and writes (one file system object).
    storage_path, storage_filesystem = storage.filesystem_for_ray(cfg["storage_path"])
    return TorchTrainer(
        train_loop_per_worker,
        # The space travels as its declaration: a space file given on the driver need not exist on the workers.
        train_loop_config={"cfg": cfg, "run_dir": plan.run_dir, "space_config": plan.space.config,
                           "resume_dir": plan.resume_dir, "plugins": list(plugins)},
        scaling_config=ScalingConfig(num_workers=scaling["num_workers"], use_gpu=scaling["use_gpu"],
                                     resources_per_worker=resources),
        # Training, BN-recalibration and validation data as Ray Datasets (raynas.data.ray_train).
        **trainer_datasets(cfg, plan.space.resolution, plan.space.in_channels),
        run_config=RunConfig(
            name=cfg["name"], storage_path=storage_path, storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=cfg["failure"]["max_failures"]),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg["checkpoint"]["num_to_keep"]),
            # Ray Train's per-report INFO lines would drown the one progress line per epoch.
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks),
        ),
    )


def train(cfg: Mapping[str, Any], *, quiet: bool = False, plugins: Sequence[str] = ()) -> TrainResult:
    """Train a supernet as configured (see pipelines/configs/*.yaml); resume the run if it exists.

    `plugins`: modules named on the command line (`--plugin`) whose strategies the config may select;
    the driver and every worker import them (see raynas.train.strategies).
    """
    from ray.train import TrainingFailedError

    from raynas.train.strategies import load_plugins

    load_plugins(plugins)
    plan = plan_run(cfg)
    cfg = plan.cfg
    scaling = cfg["scaling"]
    _ensure_ray(scaling["num_workers"], scaling["cpus_per_worker"], scaling["use_gpu"])
    storage.write_text(storage.join(plan.run_dir, CONFIG_FILE), yaml.safe_dump(cfg, sort_keys=False))
    if not quiet:
        resumed = f", resuming after epoch {plan.resume_epoch}" if plan.resume_dir else ""
        print(f"raynas train: run '{cfg['name']}' in {storage.display(plan.run_dir)}: space {plan.space.name} "
              f"(resolution {plan.space.resolution}, {plan.num_classes} classes), strategy "
              f"{cfg['strategy']['name']}, {cfg['epochs']} epochs on {scaling['num_workers']} "
              f"{'GPU' if scaling['use_gpu'] else 'CPU'} worker(s){resumed}", file=sys.stderr, flush=True)

    trainer = build_trainer(plan, plugins=plugins)
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        user_error = _user_error_of(exc)
        if user_error is not None:  # e.g. a batch larger than a worker's shard: one line, exit 2
            raise user_error from None
        raise
    return TrainResult(plan.run_dir, storage.join(plan.run_dir, SUPERNET_FILE), metrics_location(plan.run_dir),
                       checkpoint_location(plan, result), cfg["epochs"])


def checkpoint_location(plan: RunPlan, result) -> str | None:
    """The run's last checkpoint as a location: Ray names it by its path inside `storage_filesystem`;
    it is a directory of the run (named by the loop's `checkpoint_dir_name`)."""
    if result.checkpoint is None:
        return None
    return storage.join(plan.run_dir, posixpath.basename(result.checkpoint.path.rstrip("/")))
