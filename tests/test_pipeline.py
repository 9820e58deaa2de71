"""The hardware-aware NAS pipeline as a user runs it: a real Ray head started with `ray start`, the pipeline
submitted with `ray job submit --working-dir .` (train on Ray Train -> LUT on the head's `device:local-cpu` ->
search on evaluator actors -> ONNX export measured on the device -> report), and bad input failing fast.

The head runs in its own process session with its own ports and temp dir; teardown ends that session's
processes only (never `ray stop`, which would stop every Ray instance on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = "pipelines/configs/hw_nas_tiny.yaml"
# What the job does not need; keeps the upload small (runs/ and caches are also in .gitignore, which Ray honours).
EXCLUDES = [".git", "runs", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info", "benchmarks",
            "tests", "*.onnx", "*.parquet", "*.pt"]
HEAD_PORT_NAMES = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
                   "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
                   "node-manager-port", "object-manager-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A private head on loopback for one test: no token to provision (CI machines have none).
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` with the dashboard (the job server); yields the dashboard URL."""
    ports = {name: free_port() for name in HEAD_PORT_NAMES}
    temp_dir = tempfile.mkdtemp(prefix="rnp", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    cmd = ["ray", "start", "--head", "--block", "--num-cpus=2", "--disable-usage-stats",
           "--resources", json.dumps({"device:local-cpu": 1}), "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", *(f"--{k}={v}" for k, v in ports.items())]
    log = open(Path(temp_dir) / "head.log", "wb")
    head = subprocess.Popen(cmd, env=ray_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert head.poll() is None, f"ray start exited: {(Path(temp_dir) / 'head.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the Ray dashboard did not come up within 180 s"
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # the server answers
            except OSError:
                time.sleep(1)
        yield url
    finally:
        # End the head's process session (gcs, raylet, dashboard, workers, the job's driver) and nothing else:
        # SIGTERM first (`ray start --block` stops its children), then SIGKILL what has not exited.
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
            try:
                os.killpg(head.pid, sig)
                head.wait(timeout=wait_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_pipeline(ray_head, tmp_path):
    run_dir = tmp_path / "hw_nas_tiny"
    runtime_env = {"working_dir": ".", "excludes": EXCLUDES}
    cmd = ["ray", "job", "submit", "--address", ray_head, "--runtime-env-json", json.dumps(runtime_env),
           "--", "python", "pipelines/hw_nas.py", "--config", TINY, "--run-dir", str(run_dir)]
    # Waits for the job and exits non-zero unless it SUCCEEDED.
    done = subprocess.run(cmd, cwd=REPO, env=ray_env(), capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    assert "succeeded" in out

    summary = yaml.safe_load((run_dir / "summary.yaml").read_text())
    assert summary["train_s"] > 0 and summary["lut_blocks"] == 2 * 64 + 3 and summary["calibration_n"] == 4
    assert (run_dir / "train" / "supernet" / "supernet.pt").is_file()
    assert (run_dir / "lut.parquet").is_file() and (run_dir / "lut.calibration.json").is_file()
    search = run_dir / "search"
    df = pd.read_parquet(search / "evaluations.parquet")
    assert df["arch"].is_unique and len(df) == summary["search"]["evaluations"] and 8 <= len(df) <= 16
    assert df["worker"].nunique() == 2 and df["accuracy"].between(0, 1).all()
    front = pd.read_parquet(search / "front.parquet")
    assert len(front) >= 1 and set(front["arch"]) <= set(df["arch"])
    exported = pd.read_parquet(search / "exported.parquet")
    assert 1 <= len(exported) <= 2 and (exported["measured_ms"] > 0).all()
    assert all((search / p).is_file() for p in exported["onnx"])
    assert (search / "report.md").read_text().startswith("# raynas search report: nb201-tiny")
    assert (search / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def run_pipeline_script(config: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipelines/hw_nas.py", "--config", str(config),
                           "--run-dir", str(tmp_path / "run")], cwd=REPO, env=ray_env(), capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c["search"]["search"].update(algorithm="hillclimb"), "search.search.algorithm"),
    (lambda c: c["search"]["evaluator"].update(num_actors=0), "search.evaluator.num_actors"),
    (lambda c: c["train"].update(epochs="two"), "train.epochs"),
    (lambda c: c["profile"].update(calibration_n=1), "profile.calibration_n"),
    (lambda c: c.update(serach={}), "config.serach"),
])
def test_bad_config_exits_2_with_one_line_naming_the_field(mutate, field, tmp_path):
    cfg = yaml.safe_load((REPO / TINY).read_text())
    mutate(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    started = time.monotonic()
    done = run_pipeline_script(path, tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert done.stdout == ""
    assert not (tmp_path / "run").exists(), "nothing may start before the config is valid"
    assert time.monotonic() - started < 60
