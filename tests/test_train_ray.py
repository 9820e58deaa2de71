"""Supernet training through real Ray Train with 2 CPU workers (DDP over Gloo): every strategy,
checkpoints from every rank, and resuming a run by name without redoing finished epochs."""

from pathlib import Path

import pandas as pd
import pytest
import torch

from raynas import storage
from raynas.supernets.checkpoint import load_supernet
from raynas.train.strategies import register_strategy
from raynas.train.strategies.uniform import UniformStrategy
from raynas.train.trainer import train


@register_strategy
class CrashOnceStrategy(UniformStrategy):
    """`uniform`, except that the first attempt at epoch 2 fails (a worker error mid-run).

    A plug-in: selected as `crash-once` once this module is given as a plugin (`--plugin test_train_ray`,
    `train(..., plugins=[...])`); workers import it too (tests/ is on their PYTHONPATH).
    """

    name = "crash-once"
    DEFAULTS = {"marker": ""}

    def on_epoch_start(self, epoch, num_epochs):
        marker = Path(self.options["marker"])
        if epoch == 1 and not marker.exists():
            marker.touch()
            raise RuntimeError("injected worker failure in epoch 2")


def _config(tmp_path, space_yaml, name, strategy, epochs, **extra):
    return {
        "name": name, "storage_path": str(tmp_path / "runs"), "space": space_yaml,
        "data": {"name": "digits", "batch_size": 8, "max_train_samples": 64, "max_val_samples": 32,
                 "eval_batch_size": 32},
        "strategy": strategy, "epochs": epochs, "steps_per_epoch": 2, "seed": 1,
        "eval": {"bn_samples": 32, "num_random": 1},
        "scaling": {"num_workers": 2}, **extra,
    }


@pytest.mark.parametrize("strategy", [{"name": "fair"}, {"name": "sandwich", "num_random": 1}])
def test_strategy_trains_through_ray_train_with_two_workers(strategy, ray_local, tmp_path, tiny_nb201_yaml):
    result = train(_config(tmp_path, tiny_nb201_yaml, f"run-{strategy['name']}", strategy, 1), quiet=True)
    metrics = pd.read_parquet(result.metrics_path)
    assert list(metrics["epoch"]) == [1] and metrics["steps"][0] == 2 and metrics["world_size"][0] == 2
    assert metrics["strategy"][0] == strategy["name"] and metrics["loss"][0] > 0
    for key in ("teacher_acc", "min_acc", "max_acc", "random_acc"):
        assert 0.0 <= metrics[key][0] <= 1.0
    # Every rank reported its part of the checkpoint; the final supernet loads weights_only.
    files = set(storage.list_dir(result.checkpoint_dir))
    assert {"meta.json", "supernet.pt", "train_state.pt", "rng_rank0.pt", "rng_rank1.pt"} <= files
    state = storage.load_torch(storage.join(result.checkpoint_dir, "train_state.pt"))
    assert state["epoch"] == 1 and state["global_step"] == 2 and state["optimizers"]["main"]["state"]
    fresh = load_supernet(result.supernet_path)
    trained = torch.load(result.supernet_path, weights_only=True)["model"]
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in trained.items())


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rerun_and_retry_resume_from_the_last_epoch_with_identical_state(ray_local, tmp_path, tiny_nb201_yaml):
    # Constant learning rate: an epochs=1 run and the first epoch of an epochs=2 run are the same
    # computation, so "stopped after epoch 1, then resumed" must equal "never stopped" bit for bit.
    extra = {"scheduler": {"name": "constant"}}
    straight = train(_config(tmp_path, tiny_nb201_yaml, "straight", "uniform", 2, **extra), quiet=True)

    # A worker fails in epoch 2; Ray Train restarts the group (FailureConfig) and the loop resumes
    # from the epoch-1 checkpoint via ray.train.get_checkpoint().
    marker = tmp_path / "crashed"
    crash = {"name": "crash-once", "marker": str(marker)}
    retried = train(_config(tmp_path, tiny_nb201_yaml, "retried", crash, 2, failure={"max_failures": 1},
                            **extra), quiet=True, plugins=["test_train_ray"])
    assert marker.exists()
    assert list(pd.read_parquet(retried.metrics_path)["epoch"]) == [1, 2]
    assert _same_weights(_weights(straight.supernet_path), _weights(retried.supernet_path))

    # The run is stopped after epoch 1 and started again under the same name with epochs=2.
    first = train(_config(tmp_path, tiny_nb201_yaml, "resumed", "uniform", 1, **extra), quiet=True)
    epoch1_row = pd.read_parquet(first.metrics_path).iloc[0].to_dict()
    resumed = train(_config(tmp_path, tiny_nb201_yaml, "resumed", "uniform", 2, **extra), quiet=True)

    metrics = pd.read_parquet(resumed.metrics_path)
    assert list(metrics["epoch"]) == [1, 2] and list(metrics["global_step"]) == [2, 4]
    assert metrics.iloc[0].to_dict() == epoch1_row  # epoch 1 was not trained again
    assert _same_weights(_weights(straight.supernet_path), _weights(resumed.supernet_path))
    # Optimizer (momentum buffers), scheduler and sampler state continued, not restarted.
    sa = storage.load_torch(storage.join(straight.checkpoint_dir, "train_state.pt"))
    sb = storage.load_torch(storage.join(resumed.checkpoint_dir, "train_state.pt"))
    assert sb["schedulers"]["main"]["last_epoch"] == sa["schedulers"]["main"]["last_epoch"] == 4
    assert sb["strategy"] == sa["strategy"]
    for k, buf in sa["optimizers"]["main"]["state"].items():
        assert torch.equal(buf["momentum_buffer"], sb["optimizers"]["main"]["state"][k]["momentum_buffer"])
