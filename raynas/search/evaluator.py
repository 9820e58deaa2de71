"""Evaluator actors: each holds the trained supernet and scores subnets on held-out data.

Accuracy of a subnet = BatchNorm recalibrated on a fixed set of training images, then top-1 on
the validation split; with `deploy.quantized_accuracy`, top-1 of the subnet as deployed (exported and
converted to the deploy precision, run in onnxruntime: raynas.search.deployed). `export` hands back the
deployed ONNX of a front member. Both sets are fixed and ordered, so an arch scores the same on every actor:
that is what makes a resumed search identical to an uninterrupted one. They are Ray Datasets
(raynas.data.eval_dataset) materialized once by `make_evaluator_pool`: every actor reads the same
blocks from the object store, on whichever node it runs.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import ray
import torch

from raynas.search.deployed import DeployConfig, deploy_subnet
from raynas.space import Arch


@dataclass(frozen=True)
class EvaluatorConfig:
    data: dict                 # the `data:` section (raynas.data)
    bn_samples: int = 2048     # seed 000 recalibrates on 2048 training images
    batch_size: int = 256
    device: str = "cpu"        # "cuda" puts each actor on a GPU
    threads: int = 1           # torch intra-op threads per actor
    num_actors: int = 2
    deploy: DeployConfig = DeployConfig()
    eval_data: Any = None      # (BN, validation) Datasets; make_evaluator_pool sets them, else each actor builds them


class SubnetEvaluator:
    """Ray actor body (wrapped with ray.remote by `make_evaluator_pool`)."""

    def __init__(self, checkpoint: bytes, config: EvaluatorConfig):
        from raynas.data import Batches, Normalizer, normalization
        from raynas.supernets.checkpoint import load_supernet

        torch.set_num_threads(config.threads)
        self.config = config
        self.device = torch.device(config.device)
        self.supernet = load_supernet(checkpoint).to(self.device)
        space = self.supernet.space
        bn, val = config.eval_data or evaluation_data(config, space.resolution, space.in_channels)
        normalize = Normalizer(*normalization(config.data, space.in_channels))
        self.bn_loader = Batches(bn, config.batch_size, self.device, normalize)
        self.val_loader = Batches(val, config.batch_size, self.device, normalize)
        self.identity = f"{socket.gethostname()}:{os.getpid()}"

    def evaluate(self, arch_json: str) -> dict[str, Any]:
        from raynas.train.bn import evaluate_subnet

        started = time.time()
        arch = self.supernet.space.validate(Arch.from_json(arch_json))
        if self.config.deploy.quantized_accuracy:
            _, deployed = self._deploy(arch)
            scores = {"accuracy": deployed["accuracy_deployed"], "accuracy_supernet": deployed["accuracy_supernet"]}
        else:
            scores = {"accuracy": float(evaluate_subnet(self.supernet, arch, self.bn_loader, self.val_loader,
                                                        self.config.bn_samples))}
        finished = time.time()
        return {**scores, "started_at": started, "finished_at": finished,
                "eval_s": finished - started, "worker": self.identity}

    def export(self, arch_json: str) -> tuple[bytes, dict[str, Any]]:
        """The deployed ONNX of `arch` (BN recalibrated, at the deploy precision) and its accuracies."""
        return self._deploy(self.supernet.space.validate(Arch.from_json(arch_json)))

    def _deploy(self, arch: Arch) -> tuple[bytes, dict[str, Any]]:
        return deploy_subnet(self.supernet, arch, self.bn_loader, self.val_loader, self.config.bn_samples,
                             self.config.deploy)


def evaluation_data(config: EvaluatorConfig, resolution: int, channels: int) -> tuple[Any, Any]:
    """The fixed BN-recalibration images (seeded subset of the un-augmented training split) and the
    validation split, as materialized Datasets."""
    from raynas.data import eval_dataset

    bn = eval_dataset(config.data, "train", resolution, channels, num_samples=config.bn_samples, seed=0)
    return bn, eval_dataset(config.data, "val", resolution, channels)


def make_evaluator_pool(checkpoint: str, config: EvaluatorConfig, actor_cls: type = SubnetEvaluator,
                        method: str = "evaluate"):
    """An `ActorPool` of evaluator actors. The checkpoint (a local path or URI) is read once, here, and
    travels to the actors through the object store: no actor reads a file of the driver's node. So do the
    evaluation Datasets, materialized once, here."""
    from raynas import storage
    from raynas.search.pool import ActorPool
    from raynas.supernets.checkpoint import load_supernet

    checkpoint_bytes = storage.read_bytes(checkpoint, "checkpoint")
    space = load_supernet(checkpoint_bytes).space
    config = replace(config, eval_data=evaluation_data(config, space.resolution, space.in_channels))
    checkpoint_ref = ray.put(checkpoint_bytes)
    use_gpu = config.device.startswith("cuda")
    remote_cls = ray.remote(num_cpus=config.threads, num_gpus=1 if use_gpu else 0, max_restarts=0)(actor_cls)

    def make_actor():
        return remote_cls.remote(checkpoint_ref, config)

    return ActorPool(make_actor, config.num_actors, method=method)


def pool_evaluator(pool) -> Any:
    """Adapter for `run_search`: evaluate a batch of arch JSONs on the pool, yielding as they finish."""

    def evaluate(arch_jsons: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        yield from pool.map_unordered(arch_jsons)

    return evaluate
