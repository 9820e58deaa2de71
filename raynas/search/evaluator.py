"""Evaluator actors: each holds the trained supernet and scores subnets on held-out data.

Accuracy of a subnet = BatchNorm recalibrated on a fixed set of training images, then top-1 on
the validation split. Both sets are fixed and ordered, so an arch scores the same on every actor:
that is what makes a resumed search identical to an uninterrupted one.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from torch.utils.data import DataLoader

from raynas.space import Arch


@dataclass(frozen=True)
class EvaluatorConfig:
    data: dict                 # the `data:` section (raynas.data)
    bn_samples: int = 2048     # seed 000 recalibrates on 2048 training images
    batch_size: int = 256
    device: str = "cpu"        # "cuda" puts each actor on a GPU
    threads: int = 1           # torch intra-op threads per actor
    num_actors: int = 2


class SubnetEvaluator:
    """Ray actor body (wrapped with ray.remote by `make_evaluator_pool`)."""

    def __init__(self, checkpoint: bytes, config: EvaluatorConfig):
        from raynas.data import build_dataset, fixed_subset
        from raynas.supernets.checkpoint import load_supernet

        torch.set_num_threads(config.threads)
        self.config = config
        self.device = torch.device(config.device)
        self.supernet = load_supernet(checkpoint).to(self.device)
        space = self.supernet.space
        train = build_dataset(config.data, "train", space.resolution, in_channels=space.in_channels, augment=False)
        val = build_dataset(config.data, "val", space.resolution, in_channels=space.in_channels)
        bn_set = fixed_subset(train, min(config.bn_samples, len(train)), seed=0)
        self.bn_loader = DataLoader(bn_set, batch_size=config.batch_size, shuffle=False)
        self.val_loader = DataLoader(val, batch_size=config.batch_size, shuffle=False)
        self.identity = f"{socket.gethostname()}:{os.getpid()}"

    def evaluate(self, arch_json: str) -> dict[str, Any]:
        from raynas.train.bn import evaluate_subnet

        started = time.time()
        arch = self.supernet.space.validate(Arch.from_json(arch_json))
        accuracy = evaluate_subnet(self.supernet, arch, self.bn_loader, self.val_loader, self.config.bn_samples)
        finished = time.time()
        return {"accuracy": float(accuracy), "started_at": started, "finished_at": finished,
                "eval_s": finished - started, "worker": self.identity}

    def pid(self) -> int:
        return os.getpid()


def make_evaluator_pool(checkpoint_path: str, config: EvaluatorConfig, actor_cls: type = SubnetEvaluator):
    """An `ActorPool` of evaluator actors; the checkpoint travels once through the object store."""
    from raynas.search.pool import ActorPool

    checkpoint_ref = ray.put(Path(checkpoint_path).read_bytes())
    use_gpu = config.device.startswith("cuda")
    remote_cls = ray.remote(num_cpus=config.threads, num_gpus=1 if use_gpu else 0, max_restarts=0)(actor_cls)

    def make_actor():
        return remote_cls.remote(checkpoint_ref, config)

    return ActorPool(make_actor, config.num_actors)


def pool_evaluator(pool) -> Any:
    """Adapter for `run_search`: evaluate a batch of arch JSONs on the pool, yielding as they finish."""

    def evaluate(arch_jsons: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        yield from pool.map_unordered(arch_jsons)

    return evaluate
