"""The per-worker training loop: plain PyTorch, run on every Ray Train worker by TorchTrainer.

Ray provides the process group (Gloo on CPU, NCCL on GPU), the device, checkpoint storage and
restarts; everything else is here: build, resume, train with the strategy, measure, checkpoint.
"""

from __future__ import annotations

import contextlib
import random
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raynas import storage
from raynas.train.checkpointing import (
    SUPERNET_FILE,
    checkpoint_dir_name,
    find_latest_checkpoint,
    load_resume_state,
    read_meta,
    restore_rng,
    write_checkpoint,
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """None means full fp32. Mixed precision only on GPU (CPU autocast is slower than fp32 here)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _resume_dir(stack: contextlib.ExitStack, explicit_dir: str | None) -> str | None:
    """The checkpoint with the most completed epochs among Ray's (a retry within the run, or Ray's
    run snapshot; Ray downloads it to this node) and the newest complete one in the run's storage
    (read through raynas.storage, wherever it is); None for a fresh start."""
    import ray.train

    candidates: list[tuple[int, str]] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        path = stack.enter_context(checkpoint.as_directory())
        meta = read_meta(path)
        if meta is not None:
            candidates.append((meta["epoch"], path))
    if explicit_dir is not None:
        meta = read_meta(explicit_dir)
        if meta is not None:
            candidates.append((meta["epoch"], explicit_dir))
    return max(candidates, key=lambda c: c[0])[1] if candidates else None


def _mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average per-rank scalars over the ranks (every rank must pass the same keys)."""
    if not values or not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def _say(line: str) -> None:
    """One progress line to the worker's stdout (Ray forwards it to the driver). Not `print`: Ray
    Train patches print into its logger, which then shows each line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _progress_line(row: dict[str, Any], num_epochs: int) -> str:
    def pct(key: str) -> str:
        return f"{100 * row[key]:5.1f}%" if row.get(key) is not None else "   - "
    return (f"[raynas train {row['run']}] epoch {row['epoch']}/{num_epochs} loss {row['loss']:.4f} "
            f"teacher {pct('teacher_acc')} min {pct('min_acc')} max {pct('max_acc')} "
            f"random {pct('random_acc')} lr {row['lr']:.4g} {row['epoch_time_s']:.1f}s")


class WorkerRun:
    """One worker's share of a run: built from the config, then driven epoch by epoch."""

    def __init__(self, config: dict[str, Any]):
        import ray.train
        import ray.train.torch

        from raynas.space import space_from_config
        from raynas.supernets import build_supernet
        from raynas.train.optim import build_scheduler, optimizer_factory
        from raynas.train.strategies import build_strategy

        self.cfg, self.run_dir = config["cfg"], config["run_dir"]  # run_dir: a location (path or URI)
        cfg = self.cfg
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(cfg["scaling"]["cpus_per_worker"])))
        self.num_epochs = cfg["epochs"]

        # Identical initial weights on every rank and for every world size.
        seed_everything(cfg["seed"])
        self.space = space_from_config(config["space_config"])
        supernet = build_supernet(self.space, **cfg["supernet"])
        self.strategy = build_strategy(cfg["strategy"], self.space, cfg["seed"])
        self.module = self.strategy.prepare_model(supernet).to(self.device)
        seed_everything(cfg["seed"] * 1000 + self.rank)  # e.g. dropout differs across ranks

        self._build_loaders()
        self.optimizers = self.strategy.configure_optimizers(self.module, optimizer_factory(cfg["optimizer"]))
        self.schedulers = {name: build_scheduler(opt, cfg["scheduler"], self.steps_per_epoch, self.num_epochs,
                                                 self.strategy.lr_restart_epochs())
                           for name, opt in self.optimizers.items()}
        self.amp_dtype = amp_dtype_for(cfg["precision"], self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.start_epoch, self.global_step = 0, 0

    def _build_loaders(self) -> None:
        """Each rank reads its equal shard of every epoch; every rank calibrates BN on the same fixed
        images and validates on the whole validation set (Datasets from raynas.data.ray_train)."""
        from raynas.data import WorkerData

        self.data = WorkerData.from_shards(self.cfg["data"], self.space.in_channels, self.device, self.world)
        self.steps_per_epoch = self.data.train.steps  # >= 1: the driver checked (raynas.data.ray_train)

    def restore(self, explicit_dir: str | None) -> None:
        """Continue from the latest checkpoint, if any: weights, optimizers, schedules, AMP scaler,
        strategy state, this rank's RNGs and the epoch counter."""
        from raynas.train.optim import load_scheduler_state

        with contextlib.ExitStack() as stack:
            directory = _resume_dir(stack, explicit_dir)
            if directory is None:
                return
            state = load_resume_state(directory, self.rank, self.space.name)
            self.module.load_state_dict(state.model)
            for name, opt in self.optimizers.items():
                opt.load_state_dict(state.train_state["optimizers"][name])
            for name, sched in self.schedulers.items():
                load_scheduler_state(sched, state.train_state["schedulers"][name])
            self.scaler.load_state_dict(state.train_state["scaler"])
            self.strategy.load_state_dict(state.train_state["strategy"])
            if state.rng is not None:
                restore_rng(state.rng)
            self.start_epoch, self.global_step = state.epoch, state.train_state["global_step"]
        if self.rank == 0:
            _say(f"[raynas train {self.cfg['name']}] resuming from {storage.display(directory)} "
                 f"({self.start_epoch}/{self.num_epochs} epochs done)")

    def step_context(self):
        """DDP-wrap (after restoring: DDP broadcasts rank 0's weights) and build the StepContext.

        Subnets leave parameters unused, hence find_unused_parameters; gradient-accumulating
        passes skip the all-reduce through no_sync (see StepContext.forward_backward).
        """
        import ray.train.torch

        from raynas.train.strategies.base import StepContext

        model = self.module
        if self.world > 1:
            model = ray.train.torch.prepare_model(self.module, move_to_device=False,
                                                  parallel_strategy_kwargs={"find_unused_parameters": True})
        ctx = StepContext(model, self.module, self.optimizers, device=self.device, amp_dtype=self.amp_dtype,
                          scaler=self.scaler, label_smoothing=self.cfg["label_smoothing"],
                          grad_clip=self.cfg["optimizer"]["grad_clip"], world_size=self.world)
        ctx.steps_per_epoch, ctx.num_epochs, ctx.global_step = self.steps_per_epoch, self.num_epochs, self.global_step
        return ctx

    def train_epoch(self, epoch: int, ctx) -> dict[str, Any]:
        """One epoch of strategy steps; returns the per-step metrics averaged over steps and ranks."""
        self.strategy.on_epoch_start(epoch, self.num_epochs)
        self.module.train()
        ctx.epoch = epoch
        lr = float(next(iter(self.optimizers.values())).param_groups[0]["lr"])
        sums: dict[str, float] = defaultdict(float)
        steps = 0
        log_every = self.cfg["log_every"]
        # The shard holds exactly steps_per_epoch full batches, already on the device and normalised;
        # it is read to its end, which is how Ray Data's split learns that this rank's epoch is done.
        for step, (x, y) in enumerate(self.data.train.epoch(epoch)):
            ctx.step = step
            metrics = self.strategy.train_step(x, y, ctx)
            for sched in self.schedulers.values():
                sched.step()
            ctx.global_step += 1
            steps += 1
            for key, value in metrics.items():
                sums[key] += float(value)
            if self.rank == 0 and log_every and (step + 1) % log_every == 0:
                _say(f"[raynas train {self.cfg['name']}] epoch {epoch + 1} step {step + 1}/{self.steps_per_epoch} "
                     f"loss {metrics.get('loss', float('nan')):.4f}")
        means = _mean_across_ranks({k: v / max(steps, 1) for k, v in sums.items()}, self.device)
        return {"steps": steps, "global_step": ctx.global_step, "lr": lr, **means}  # lr: at the first step

    def measure(self, epoch: int, ctx) -> dict[str, Any]:
        """Teacher / min / max / random subnet accuracy after BN recalibration, when due."""
        from raynas.train.evaluation import epoch_archs, evaluate_epoch

        ev = self.cfg["eval"]
        due = ev["every"] and ((epoch + 1) % ev["every"] == 0 or epoch + 1 == self.num_epochs)
        if not due:
            return {}
        archs = epoch_archs(self.space, self.strategy.teacher_arch(), ev["num_random"], ev["seed"], epoch)
        return evaluate_epoch(self.module, archs, self.data.bn, self.data.val, ev["bn_samples"], self.device,
                              rank=self.rank, world_size=self.world, autocast=ctx.autocast)

    def checkpoint(self, epoch: int, ctx, row: dict[str, Any]) -> None:
        """Append the epoch's metrics (rank 0), then report them with every rank's checkpoint part."""
        import ray.train
        from ray.train import Checkpoint

        from raynas.train.metrics import append_metrics

        train_state = {
            "epoch": epoch + 1, "global_step": ctx.global_step,
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
            "scaler": self.scaler.state_dict(), "strategy": self.strategy.state_dict(),
        }
        exported = self.strategy.export_supernet(self.module) if self.rank == 0 else None
        if self.rank == 0:
            # Before the report: a crash in between only makes the epoch re-run and its row replaced.
            append_metrics(self.run_dir, row)
        # A node-local staging directory: `report` uploads it into the run's storage, and it goes.
        with tempfile.TemporaryDirectory(prefix="raynas-ckpt-") as tmp:
            write_checkpoint(tmp, rank=self.rank, epoch=epoch + 1, world_size=self.world, supernet=exported,
                             trained_module=self.module, train_state=train_state, strategy_name=self.strategy.name)
            ray.train.report({k: v for k, v in row.items() if isinstance(v, (int, float, str))},
                             checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_dir_name(epoch + 1))

    def run(self) -> None:
        from raynas.supernets.checkpoint import save_supernet

        ctx = self.step_context()
        batch = self.cfg["data"]["batch_size"]
        for epoch in range(self.start_epoch, self.num_epochs):
            started = time.perf_counter()
            row: dict[str, Any] = {"run": self.cfg["name"], "epoch": epoch + 1, "space": self.space.name,
                                   "strategy": self.strategy.name, "world_size": self.world}
            row.update(self.train_epoch(epoch, ctx))
            train_time = time.perf_counter() - started
            row.update(self.measure(epoch, ctx))
            row["train_time_s"] = train_time
            row["samples_per_s"] = row["steps"] * batch * self.world / max(train_time, 1e-9)
            row["epoch_time_s"] = time.perf_counter() - started
            self.checkpoint(epoch, ctx, row)
            if self.rank == 0:
                _say(_progress_line(row, self.num_epochs))
        if self.rank == 0:
            save_supernet(self.strategy.export_supernet(self.module), storage.join(self.run_dir, SUPERNET_FILE),
                          extra={"epoch": self.num_epochs, "strategy": self.strategy.name})


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every `report` call with its whole metrics dict at INFO, once per worker; our own
    one-line epoch summary (`_progress_line`) says the same, so those logs are raised to WARNING."""
    import logging

    try:  # a private module: if a Ray release moves it, the logs stay as they are
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)  # Ray names that logger by its file


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker. `config`: {"cfg", "run_dir", "space_config", "resume_dir",
    "plugins"}; the locations are local paths or URIs, read and written through raynas.storage."""
    from raynas.train.strategies import load_plugins

    _quiet_ray_train_reports()
    load_plugins(config.get("plugins", ()))  # the strategy modules the driver was given (--plugin)
    run = WorkerRun(config)
    # The newest complete checkpoint in the run's storage now, not only the one the driver found when it
    # planned the run: a worker group restarted after a worker died (SIGKILL, OOM) continues from the last
    # epoch stored, even when Ray's controller had not yet registered that epoch's report.
    run.restore(find_latest_checkpoint(config["run_dir"]))
    run.run()
