"""Supernet training whose only shared state is object storage: a real Ray Train run against the real
S3-compatible test server (moto, `s3_bucket`), resume from the bucket in a fresh working directory, the
`raynas train --storage s3://...` command, and an unwritable storage path refused before any work."""

import json
import os
import subprocess
import sys
from urllib.parse import urlsplit

import boto3
import pandas as pd
import pytest
import torch
import yaml

from raynas import storage
from raynas.train.trainer import train

RAY_RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints


def _config(space_yaml, storage_path, name, epochs):
    # Constant learning rate: a 1-epoch run is exactly the first epoch of a 2-epoch one.
    return {
        "name": name, "storage_path": storage_path, "space": space_yaml,
        "data": {"name": "synthetic", "num_samples": 32, "num_val_samples": 16, "image_size": 16,
                 "batch_size": 8, "eval_batch_size": 16},
        "strategy": "uniform", "epochs": epochs, "steps_per_epoch": 2, "seed": 3,
        "scheduler": {"name": "constant"}, "eval": {"bn_samples": 16, "num_random": 1},
        "scaling": {"num_workers": 1},
    }


def _objects(bucket_uri, prefix):
    """The keys really stored in the bucket under `prefix`, asked of the server with boto3."""
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=urlsplit(bucket_uri).netloc, Prefix=prefix)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


def _weights(location):
    return storage.load_torch(location)["model"]


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _fresh_cwd(tmp_path, monkeypatch, name):
    """An empty working directory, as a driver on another node would have."""
    cwd = tmp_path / name
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_run_keeps_everything_in_the_bucket(ray_s3, s3_bucket, tiny_nb201_yaml, tmp_path, monkeypatch):
    cwd = _fresh_cwd(tmp_path, monkeypatch, "work")
    runs = f"{s3_bucket}/runs"
    result = train(_config(tiny_nb201_yaml, runs, "s3run", 1), quiet=True)

    assert result.run_dir == f"{runs}/s3run"
    assert result.supernet_path == f"{runs}/s3run/supernet.pt"
    assert result.metrics_path == f"{runs}/s3run/metrics.parquet"
    assert result.checkpoint_dir == f"{runs}/s3run/epoch_0001"
    keys = _objects(s3_bucket, "runs/s3run/")
    for name in ("config.yaml", "metrics.parquet", "supernet.pt", "epoch_0001/meta.json", "epoch_0001/supernet.pt",
                 "epoch_0001/train_state.pt", "epoch_0001/rng_rank0.pt"):
        assert f"runs/s3run/{name}" in keys, name
    assert {"config.yaml", "metrics.parquet", "supernet.pt", "epoch_0001"} <= set(storage.list_dir(result.run_dir))

    metrics = result.metrics()
    assert list(metrics["epoch"]) == [1] and metrics["steps"][0] == 2 and metrics["loss"][0] > 0
    saved_cfg = yaml.safe_load(storage.read_text(storage.join(result.run_dir, "config.yaml")))
    assert saved_cfg["storage_path"] == runs and saved_cfg["name"] == "s3run"
    # The run's supernet is the epoch checkpoint's, both readable from the bucket with weights_only.
    assert _same_weights(_weights(result.supernet_path), _weights(storage.join(result.checkpoint_dir, "supernet.pt")))
    assert list(cwd.iterdir()) == []  # nothing of the run landed in the working directory


def test_rerun_resumes_from_the_bucket_in_a_fresh_working_directory(ray_s3, s3_bucket, tiny_nb201_yaml,
                                                                   tmp_path, monkeypatch):
    runs = f"{s3_bucket}/runs"
    _fresh_cwd(tmp_path, monkeypatch, "straight")
    straight = train(_config(tiny_nb201_yaml, runs, "straight", 2), quiet=True)

    # Stopped after epoch 1 ...
    first_cwd = _fresh_cwd(tmp_path, monkeypatch, "first")
    first = train(_config(tiny_nb201_yaml, runs, "resumed", 1), quiet=True)
    epoch1_row = first.metrics().iloc[0].to_dict()
    # Without Ray's own run snapshot (a driver killed before writing it), so the workers resume from what
    # the driver found in the bucket and read from there (raynas.storage), not from a copy Ray restores.
    snapshot = storage.join(first.run_dir, RAY_RUN_SNAPSHOT)
    assert storage.is_file(snapshot)  # if Ray renames it, this test must learn the new name
    storage.delete(snapshot)
    # ... and started again elsewhere: only the bucket holds the run.
    second_cwd = _fresh_cwd(tmp_path, monkeypatch, "second")
    resumed = train(_config(tiny_nb201_yaml, runs, "resumed", 2), quiet=True)

    metrics = resumed.metrics()
    assert list(metrics["epoch"]) == [1, 2] and list(metrics["global_step"]) == [2, 4]
    assert metrics.iloc[0].to_dict() == epoch1_row  # epoch 1 (its timings too) was not trained again
    assert _same_weights(_weights(straight.supernet_path), _weights(resumed.supernet_path))
    sa = storage.load_torch(storage.join(straight.checkpoint_dir, "train_state.pt"))
    sb = storage.load_torch(storage.join(resumed.checkpoint_dir, "train_state.pt"))
    assert sa["epoch"] == sb["epoch"] == 2 and sa["strategy"] == sb["strategy"]
    for k, buf in sa["optimizers"]["main"]["state"].items():
        assert torch.equal(buf["momentum_buffer"], sb["optimizers"]["main"]["state"][k]["momentum_buffer"])
    assert list(first_cwd.iterdir()) == [] and list(second_cwd.iterdir()) == []


def _cli(args, cwd):
    # env: the S3 endpoint and credentials the s3_server fixture put in os.environ (as a user's shell has).
    return subprocess.run([sys.executable, "-m", "raynas.cli", *args], cwd=cwd, env=dict(os.environ),
                          capture_output=True, text=True, timeout=300)


def test_cli_trains_into_an_s3_storage_uri(s3_bucket, tiny_nb201_yaml, tmp_path):
    config = tmp_path / "tiny.yaml"
    cfg = _config(tiny_nb201_yaml, str(tmp_path / "unused"), "clirun", 1)
    config.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "storage_path"}))
    cwd = tmp_path / "work"
    cwd.mkdir()
    done = _cli(["train", str(config), "--storage", f"{s3_bucket}/cli"], cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["run_dir"] == f"{s3_bucket}/cli/clirun" and out["checkpoint"] == f"{s3_bucket}/cli/clirun/epoch_0001"
    assert storage.is_file(out["supernet"]) and list(pd.read_parquet(out["metrics"])["epoch"]) == [1]
    assert {"cli/clirun/supernet.pt", "cli/clirun/metrics.parquet", "cli/clirun/config.yaml",
            "cli/clirun/epoch_0001/meta.json"} <= _objects(s3_bucket, "cli/")
    assert not (tmp_path / "unused").exists() and list(cwd.iterdir()) == []


@pytest.mark.parametrize("where", ["under-a-file", "missing-bucket"])
def test_unwritable_storage_path_is_one_line_before_any_work(where, s3_server, tiny_nb201_yaml, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    location = {"under-a-file": str(tmp_path / "a-file" / "runs"),
                "missing-bucket": "s3://raynas-no-such-bucket/runs"}[where]
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(_config(tiny_nb201_yaml, location, "never", 1)))
    done = _cli(["train", str(config)], tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"raynas: error: storage_path: {location} is not writable")
