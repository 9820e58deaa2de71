"""raynas on a real multi-node cluster whose only shared state is object storage.

A head that runs no work and two worker nodes, one labelled as the device `local-cpu`, each a separate
`ray start` process; a real S3-compatible server (moto) on 127.0.0.1 holds every artifact. The pipeline is
submitted with `ray job submit --working-dir .` and an `s3://` run directory; it then runs again from the
CLI in an empty working directory, and must re-evaluate nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cluster_helpers import RayCluster, ray_env

from raynas import storage

REPO = Path(__file__).resolve().parents[1]
TINY = "pipelines/configs/hw_nas_tiny.yaml"
# What the job does not need; keeps the upload small (runs/ and caches are also in .gitignore, which Ray honours).
EXCLUDES = [".git", "runs", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info", "benchmarks",
            "tests", "*.onnx", "*.parquet", "*.pt"]


@pytest.fixture(scope="module")
def cluster(s3_server):
    """Head (0 CPUs: it runs no work), a CPU worker node and a board labelled device=local-cpu."""
    cluster = RayCluster(head_cpus=0)
    try:
        cluster.add_worker("cpu-worker", num_cpus=2)
        cluster.add_worker("board", num_cpus=1, labels={"device": "local-cpu"})
        cluster.wait_for_nodes(3)
        yield cluster
    finally:
        cluster.stop()


def _files_under(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def _node_ids_by_label(cluster: RayCluster) -> dict[str, str]:
    script = ("import json, ray\n"
              f"ray.init(address='{cluster.address}', log_to_driver=False)\n"
              "print(json.dumps({n['NodeID']: n['Labels'].get('device', '') for n in ray.nodes() if n['Alive']}))\n")
    done = subprocess.run([sys.executable, "-c", script], env=ray_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_pipeline_job_on_a_multinode_cluster_keeps_every_artifact_in_the_bucket(cluster, s3_bucket, tmp_path):
    run_dir = f"{s3_bucket}/tiny"
    before = _files_under(REPO)
    runtime_env = {"working_dir": ".", "excludes": EXCLUDES}
    cmd = ["ray", "job", "submit", "--address", cluster.dashboard_url, "--runtime-env-json", json.dumps(runtime_env),
           "--", "python", "pipelines/hw_nas.py", "--config", TINY, "--run-dir", run_dir]
    done = subprocess.run(cmd, cwd=REPO, env=ray_env(), capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "succeeded" in out

    # Every artifact is in the bucket ...
    summary = yaml.safe_load(storage.read_text(storage.join(run_dir, "summary.yaml")))
    assert summary["train_s"] > 0 and summary["lut_blocks"] == 2 * 64 + 3 and summary["calibration_n"] == 4
    train_run = storage.join(run_dir, "train", "supernet")
    assert storage.is_file(storage.join(train_run, "supernet.pt"))
    assert storage.is_file(storage.join(train_run, "metrics.parquet"))
    assert any(n.startswith("epoch_") for n in storage.list_dir(train_run)), storage.list_dir(train_run)
    assert storage.is_file(storage.join(run_dir, "lut.parquet"))
    assert storage.is_file(storage.join(run_dir, "lut.calibration.json"))
    search = storage.join(run_dir, "search")
    evaluations = storage.read_pandas(storage.join(search, "evaluations.parquet"))
    assert evaluations["arch"].is_unique and len(evaluations) == summary["search"]["evaluations"]
    assert evaluations["worker"].nunique() == 2 and evaluations["accuracy"].between(0, 1).all()
    front = storage.read_pandas(storage.join(search, "front.parquet"))
    assert len(front) >= 1 and set(front["arch"]) <= set(evaluations["arch"])
    exported = storage.read_pandas(storage.join(search, "exported.parquet"))
    assert 1 <= len(exported) <= 2 and (exported["measured_ms"] > 0).all()
    assert all(storage.is_file(storage.join(search, p)) for p in exported["onnx"])
    assert storage.read_text(storage.join(search, "report.md")).startswith("# raynas search report: nb201-tiny")
    assert storage.read_bytes(storage.join(search, "pareto.png"))[:4] == b"\x89PNG"
    # ... the exported subnets were timed on the board, the node labelled device=local-cpu ...
    labels = _node_ids_by_label(cluster)
    board = [node for node, device in labels.items() if device == "local-cpu"]
    assert len(board) == 1 and set(exported["measured_node"]) == set(board)
    # ... and the submitting directory gained no artifact.
    assert _files_under(REPO) == before

    # Re-run from an empty working directory with the CLI, a driver of its own: nothing is recomputed.
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {**ray_env(), "RAY_ADDRESS": cluster.address}
    config = yaml.safe_load((REPO / TINY).read_text())
    config["train"]["space"] = str(REPO / config["train"]["space"])
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    again = subprocess.run([sys.executable, "-m", "raynas.cli", "pipeline", str(tmp_path / "tiny.yaml"),
                            "--run-dir", run_dir], cwd=workdir, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-6000:]
    assert list(workdir.iterdir()) == []
    evaluations_again = storage.read_pandas(storage.join(search, "evaluations.parquet"))
    assert len(evaluations_again) == len(evaluations)
    assert sorted(evaluations_again["stored_at"]) == sorted(evaluations["stored_at"]), "an arch was re-evaluated"
    metrics = storage.read_pandas(storage.join(train_run, "metrics.parquet"))
    assert list(metrics["epoch"]) == [1, 2]


def test_aws_endpoint_reaches_every_node(cluster, s3_bucket):
    """A task on each worker node writes through the storage layer with nothing but the environment."""
    script = ("import ray\n"
              "from raynas import storage\n"
              f"ray.init(address='{cluster.address}', log_to_driver=False)\n"
              "@ray.remote(num_cpus=0.1)\n"
              "def write(i):\n"
              "    node = ray.get_runtime_context().get_node_id()\n"
              f"    storage.write_text(storage.join('{s3_bucket}', 'probe', node), 'x')\n"
              "from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as At\n"
              "nodes = [n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU')]\n"
              "ray.get([write.options(scheduling_strategy=At(n, soft=False)).remote(i) for i, n in enumerate(nodes)])\n"
              "print(len(nodes))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**ray_env(), "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.strip().splitlines()[-1]) == 2
    assert len(storage.list_dir(storage.join(s3_bucket, "probe"))) == 2
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")


def _train_config(tmp_path: Path, space_yaml: str, name: str) -> Path:
    cfg = {
        "name": name, "space": space_yaml,
        "data": {"name": "synthetic", "num_samples": 256, "num_val_samples": 64, "image_size": 8, "batch_size": 16},
        "strategy": "uniform", "epochs": 3, "steps_per_epoch": 8, "seed": 3,
        # Constant learning rate: the resumed run's schedule is trivially the uninterrupted one.
        "scheduler": {"name": "constant"}, "eval": {"bn_samples": 32, "num_random": 1},
        "scaling": {"num_workers": 1}, "failure": {"max_failures": 2},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _submit_train(cluster: RayCluster, config: Path, storage_path: str, **popen) -> subprocess.Popen:
    runtime_env = {"working_dir": ".", "excludes": EXCLUDES}
    cmd = ["ray", "job", "submit", "--address", cluster.dashboard_url, "--runtime-env-json", json.dumps(runtime_env),
           "--", "python", "-m", "raynas.cli", "train", str(config), "--storage", storage_path]
    return subprocess.Popen(cmd, cwd=REPO, env=ray_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def test_worker_node_lost_mid_training_resumes_from_the_bucket(s3_server, s3_bucket, tmp_path, tiny_nb201_yaml):
    """The node running the Ray Train worker is SIGKILLed after the first epoch checkpoint; a new node joins.
    The run continues from the checkpoint in the bucket (epoch 1 is not trained again) and ends with the
    weights of an uninterrupted run."""
    import time

    import torch

    storage_path = f"{s3_bucket}/runs"
    cluster = RayCluster(head_cpus=0)
    try:
        first_node = cluster.add_worker("node-a", num_cpus=2)
        cluster.wait_for_nodes(2)
        straight = _submit_train(cluster, _train_config(tmp_path, tiny_nb201_yaml, "straight"), storage_path)
        out, _ = straight.communicate(timeout=600)
        assert straight.returncode == 0, out[-5000:]

        job = _submit_train(cluster, _train_config(tmp_path, tiny_nb201_yaml, "lost-node"), storage_path)
        run = storage.join(storage_path, "lost-node")
        deadline = time.monotonic() + 300
        while not storage.is_file(storage.join(run, "epoch_0001", "meta.json")):
            assert job.poll() is None, job.stdout.read()[-5000:]
            assert time.monotonic() < deadline, "no epoch-1 checkpoint within 300 s"
            time.sleep(0.2)
        epoch1 = storage.read_pandas(storage.join(run, "metrics.parquet")).iloc[0].to_dict()
        # Kill first, then let a new node join: the run cannot finish its last epochs in the time a node takes
        # to join (on a busy host that took longer than the two remaining tiny epochs), and the restarted
        # worker group waits for the new node's resources.
        cluster.kill_node(first_node)
        cluster.add_worker("node-b", num_cpus=2)
        out, _ = job.communicate(timeout=600)
        assert job.returncode == 0, out[-5000:]
        # The node really was lost mid-run: the new worker group resumed from a stored checkpoint.
        assert "resuming from" in out, out[-5000:]
    finally:
        cluster.stop()

    metrics = storage.read_pandas(storage.join(run, "metrics.parquet"))
    assert list(metrics["epoch"]) == [1, 2, 3]
    assert metrics.iloc[0].to_dict() == epoch1, "epoch 1 was trained again"
    final = storage.load_torch(storage.join(run, "supernet.pt"))["model"]
    reference = storage.load_torch(storage.join(storage_path, "straight", "supernet.pt"))["model"]
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in final)
