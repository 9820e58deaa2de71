"""What object storage costs the pipeline: the tiny hw-NAS pipeline with `run_dir` on local disk vs. on an
S3-compatible server on this machine (moto's server mode on 127.0.0.1, started here), same machine, same
config, alternating runs. Prints per-run wall time and per-stage times, then median / min / max per target
and the S3 : local ratio of the medians.

    python benchmarks/storage_overhead.py [--repeats 2] [--config pipelines/configs/hw_nas_tiny.yaml]

Each run is a fresh `raynas pipeline` process (its own local Ray), so no state carries between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start_s3_server() -> tuple[subprocess.Popen, dict[str, str]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
            break
        except OSError:
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    return server, env


def run_once(config: str, run_dir: str, env: dict[str, str]) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "raynas.cli", "pipeline", config, "--run-dir", run_dir],
                          cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"pipeline failed for {run_dir}:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return {"wall_s": round(wall, 1), "train_s": summary.get("train_s"), "profile_s": summary.get("profile_s"),
            "search_s": summary["search"]["wall_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--config", default="pipelines/configs/hw_nas_tiny.yaml")
    args = parser.parse_args()

    server, s3_env = start_s3_server()
    try:
        import pyarrow.fs as pafs

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        pafs.S3FileSystem(endpoint_override=s3_env["AWS_ENDPOINT_URL"], access_key="bench", secret_key="bench",
                          allow_bucket_creation=True).create_dir(bucket)
        results: dict[str, list[dict]] = {"local": [], "s3": []}
        with tempfile.TemporaryDirectory(prefix="storage-bench-") as tmp:
            for i in range(args.repeats):
                for target in ("local", "s3"):
                    run_dir = f"{tmp}/run{i}" if target == "local" else f"s3://{bucket}/run{i}"
                    row = run_once(args.config, run_dir, s3_env)
                    results[target].append(row)
                    print(f"run {i} {target:5s}: {json.dumps(row)}", flush=True)
    finally:
        server.terminate()
    medians = {}
    for target, rows in results.items():
        walls = [r["wall_s"] for r in rows]
        medians[target] = statistics.median(walls)
        print(f"{target:5s}: n={len(walls)} wall median {medians[target]:.1f} s (min {min(walls):.1f}, "
              f"max {max(walls):.1f})")
    print(f"S3 : local wall-time ratio (medians) = {medians['s3'] / medians['local']:.3f}")


if __name__ == "__main__":
    main()
