import os
import socket

import numpy as np
import pytest
import torch

# Tests run on 2 cores next to Ray workers: one intra-op thread keeps timings sane.
torch.set_num_threads(1)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# Ray workers import actor/strategy classes defined in test modules: they inherit this PYTHONPATH
# from the raylet that any test's ray.init starts.
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, os.environ.get("PYTHONPATH", "")) if p)


def start_local_ray():
    """A real local Ray (2 CPUs, like CI) whose node is labelled as the device `local-cpu`.

    Reuses the running instance when it is such a one; a test module that needed another shape of
    cluster (e.g. the two-node one in test_hw) may have replaced it, and then it is restarted.
    """
    import ray

    if ray.is_initialized():
        nodes = ray.nodes()
        if len(nodes) == 1 and nodes[0].get("Labels", {}).get("device") == "local-cpu":
            return ray
        ray.shutdown()
    # address="local": never join a cluster that some `ray start` left running on the machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             labels={"device": "local-cpu"})
    return ray


@pytest.fixture
def ray_local():
    yield start_local_ray()


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_end():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, in its own process.

    Sets the standard AWS variables in this process's environment, so pyarrow here and every Ray node
    started afterwards (they inherit the environment) reach it as they would reach MinIO or AWS.
    Yields the endpoint URL.
    """
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert server.poll() is None, "moto's server exited at start"
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
            break
        except OSError:
            assert time.monotonic() < deadline, "moto's server did not answer within 60 s"
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    try:
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
          "AWS_EC2_METADATA_DISABLED")


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the test S3 server; yields its URI `s3://NAME`."""
    import uuid

    import pyarrow.fs as pafs

    name = f"raynas-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True).create_dir(name)
    yield f"s3://{name}"


@pytest.fixture
def ray_s3(s3_server):
    """The local Ray of the tests, its node started with the S3 server's variables in its environment (as
    every node of a real cluster has them). Ray workers read the environment their node started with, so
    one that an earlier test module started before `s3_server` existed is replaced."""
    import ray

    if ray.is_initialized():
        @ray.remote(num_cpus=0)
        def endpoint():
            return os.environ.get("AWS_ENDPOINT_URL")

        if ray.get(endpoint.remote()) != s3_server:
            ray.shutdown()
    return start_local_ray()


@pytest.fixture(scope="session")
def tiny_nb201_yaml(tmp_path_factory):
    """The NB201 cell space on a tiny skeleton (C=4, one cell per stage): a space YAML path for fast
    training tests. Same dims and ops as the built-in `nb201`."""
    import yaml

    from raynas.space.loader import builtin_spaces_dir

    cfg = yaml.safe_load((builtin_spaces_dir() / "nb201.yaml").read_text())
    cfg.update(name="nb201-tiny", channels=[4, 8, 16], cells_per_stage=1, resolution=16, num_classes=10)
    path = tmp_path_factory.mktemp("spaces") / "nb201-tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)
