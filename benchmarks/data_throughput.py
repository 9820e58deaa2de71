"""Data throughput: images per second delivered to 2 Ray Train workers, through Ray Data (raynas.data,
what training uses) and through the torch DataLoader path it replaced (reimplemented here, only for
this comparison: a map-style dataset resizing and normalising one image at a time, a DistributedSampler
per rank, a DataLoader without worker processes).

Both paths deliver digits at resolution 32 (3 channels), batches of 64 per worker, full batches only,
normalised, to the same TorchTrainer setup, and nothing else happens in the loop: the figure is what
the data path can feed. Each repetition runs both paths, alternately, in the same Ray session; the
first epoch of each trainer (start-up, first reads) is left out and the next `--epochs` are timed.
Prints median, min and max over the repetitions.

    python benchmarks/data_throughput.py [--repetitions 3] [--epochs 3] [--cpus N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESOLUTION, CHANNELS, BATCH, WORKERS = 32, 3, 64, 2


def _timed_epochs(epochs, run_epoch) -> dict:
    """Run epoch 0 untimed, then `epochs` timed ones; images and seconds summed over the ranks' view."""
    import torch
    import torch.distributed as dist

    run_epoch(0)
    images, started = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        images += run_epoch(epoch)
    seconds = time.perf_counter() - started
    t = torch.tensor([float(images), seconds], dtype=torch.float64)
    total = t.clone()
    dist.all_reduce(total[:1])                        # images of all ranks
    dist.all_reduce(total[1:], op=dist.ReduceOp.MAX)  # the slowest rank's time
    return {"images": total[0].item(), "seconds": total[1].item()}


def _report(metrics: dict) -> None:
    # Ray Train keeps the metrics reported with a checkpoint (they come back as `Result.metrics`).
    import tempfile

    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def ray_data_loop(config: dict) -> None:
    import torch

    from raynas.data import WorkerData

    worker = WorkerData.from_shards(config["data"], CHANNELS, torch.device("cpu"), WORKERS)

    def run_epoch(epoch: int) -> int:
        return sum(len(y) for _, y in worker.train.epoch(epoch))

    _report(_timed_epochs(config["epochs"], run_epoch))


def dataloader_loop(config: dict) -> None:
    """The previous path: every rank builds the dataset in memory and reads its DistributedSampler shard."""
    import numpy as np
    import ray.train
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, Dataset, DistributedSampler

    class DigitsDataset(Dataset):
        def __init__(self):
            bunch = load_digits()
            images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
            perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
            train = perm[int(round(0.2 * len(images))):].sort().values  # the fixed hold-out's train part
            self.images, self.labels = images[train], torch.from_numpy(bunch.target[train.numpy()])
            self.mean, self.std = self.images.mean(), self.images.std()

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            x = F.interpolate(self.images[i].unsqueeze(0), size=(RESOLUTION, RESOLUTION), mode="bilinear",
                              align_corners=False).squeeze(0)
            x = x.expand(CHANNELS, -1, -1).contiguous()
            return (x - self.mean) / self.std, int(self.labels[i])

    context = ray.train.get_context()
    dataset = DigitsDataset()
    sampler = DistributedSampler(dataset, num_replicas=context.get_world_size(), rank=context.get_world_rank(),
                                 shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, drop_last=True, num_workers=0)

    def run_epoch(epoch: int) -> int:
        sampler.set_epoch(epoch)
        return sum(len(y) for _, y in loader)

    _report(_timed_epochs(config["epochs"], run_epoch))


def run(path: str, epochs: int, storage: str) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raynas.data import trainer_datasets, validate_data_config

    data = validate_data_config({"name": "digits", "batch_size": BATCH, "eval_batch_size": 256})
    extra = {}
    if path == "ray_data":
        cfg = {"data": data, "eval": {"bn_samples": 256, "seed": 0}, "seed": 0, "steps_per_epoch": None,
               "scaling": {"num_workers": WORKERS, "cpus_per_worker": 1}}
        extra = trainer_datasets(cfg, RESOLUTION, CHANNELS)
    loop = ray_data_loop if path == "ray_data" else dataloader_loop
    result = TorchTrainer(loop, train_loop_config={"data": data, "epochs": epochs},
                          scaling_config=ScalingConfig(num_workers=WORKERS),
                          run_config=RunConfig(name=f"{path}-{time.time_ns()}", storage_path=storage),
                          **extra).fit()
    return result.metrics["images"] / result.metrics["seconds"]


def main() -> None:
    import tempfile

    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per trainer (after one untimed)")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    args = parser.parse_args()

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    rates: dict[str, list[float]] = {"ray_data": [], "dataloader": []}
    with tempfile.TemporaryDirectory(prefix="raynas-data-bench-") as storage:
        for rep in range(args.repetitions):
            for path in (("ray_data", "dataloader") if rep % 2 == 0 else ("dataloader", "ray_data")):
                rates[path].append(run(path, args.epochs, storage))
                print(f"repetition {rep + 1}: {path} {rates[path][-1]:.0f} images/s", file=sys.stderr, flush=True)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    print(f"digits, resolution {RESOLUTION}, {WORKERS} Ray Train workers x batch {BATCH}, {cpus} CPUs, "
          f"{args.epochs} timed epochs, {args.repetitions} repetitions (images/s delivered, all workers together)")
    for path, values in rates.items():
        print(f"  {path:10s} median {statistics.median(values):9.0f}  min {min(values):9.0f}  max {max(values):9.0f}")
    print(json.dumps({path: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
                      for path, v in rates.items()}))


if __name__ == "__main__":
    main()
