"""Devices found by node label on a real multi-node Ray cluster: placement by label, boards that still
advertise the older `device:<name>` resource, the missing-device error, one profiler per device at a time,
the local node's label, and the join script's refusal to start without a cluster token."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from raynas.hw.devices import LOCAL_CPU, DeviceNotPresent, MeasurementProtocol, device_nodes, devices_present
from raynas.hw.measure import identity_onnx

REPO = Path(__file__).resolve().parents[1]
FAST = MeasurementProtocol(warmup_s=0.02, min_warmup_runs=2, runs=50, repeats=1)


def _device(name: str):
    return replace(LOCAL_CPU, name=name, protocol=FAST)


@pytest.fixture(scope="module")
def boards():
    """A head that is no device (0 CPUs), a node labelled device=board-a, and a node that advertises only the
    older resource device:old-board."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # another module's local Ray: step aside (conftest restarts it when needed)
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    labelled = cluster.add_node(num_cpus=1, labels={"device": "board-a"})
    old = cluster.add_node(num_cpus=0, resources={"device:old-board": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield {"head": cluster.head_node.node_id, "board-a": labelled.node_id, "old-board": old.node_id}
    ray.shutdown()
    cluster.shutdown()


def _measure_once(profiler) -> dict:
    import ray

    (record,) = ray.get(profiler.actor.measure.remote([("id", identity_onnx((1, 3, 4, 4)), (1, 3, 4, 4))]))
    return record


def test_devices_present_reports_labels_and_resources(boards):
    assert device_nodes() == {"board-a": {"label": 1, "resource": 0.0}, "old-board": {"label": 0, "resource": 1.0}}
    assert devices_present() == {"board-a": 1, "old-board": 1.0}


def test_labelled_node_gets_the_profiler(boards):
    from raynas.hw.remote import start_profiler

    profiler = start_profiler(_device("board-a"))
    try:
        assert profiler.node["node_id"] == boards["board-a"]
        record = _measure_once(profiler)
        assert record["node_id"] == boards["board-a"] and record["runs"] == 50 and record["median_ms"] > 0
    finally:
        profiler.stop()


def test_resource_only_board_still_works(boards):
    from raynas.hw.remote import start_profiler

    profiler = start_profiler(_device("old-board"))
    try:
        assert profiler.node["node_id"] == boards["old-board"]
        assert _measure_once(profiler)["node_id"] == boards["old-board"]
    finally:
        profiler.stop()


def test_missing_device_fails_within_seconds_naming_the_devices_present(boards):
    from raynas.hw.remote import start_profiler

    t0 = time.monotonic()
    with pytest.raises(DeviceNotPresent) as err:
        start_profiler(_device("jetson-orin"))
    assert time.monotonic() - t0 < 10
    message = str(err.value)
    assert "\n" not in message and "device 'jetson-orin'" in message and "device=jetson-orin" in message
    assert "['board-a', 'old-board']" in message


def test_one_profiler_per_device_at_a_time(boards):
    """Measurements on a board never overlap: a second profiler of the device waits for the first (here it
    gives up after 1 s), while another device is free; once the first stops, the device is free again."""
    from raynas.hw.remote import start_profiler

    first = start_profiler(_device("board-a"))
    try:
        t0 = time.monotonic()
        with pytest.raises(DeviceNotPresent, match="device 'board-a': busy"):
            start_profiler(_device("board-a"), ready_timeout_s=1.0)
        assert time.monotonic() - t0 < 10
        other = start_profiler(_device("old-board"), ready_timeout_s=30.0)
        other.stop()
        assert _measure_once(first)["node_id"] == boards["board-a"]  # the first is untouched
    finally:
        first.stop()
    again = start_profiler(_device("board-a"), ready_timeout_s=30.0)
    try:
        assert again.node["node_id"] == boards["board-a"]
    finally:
        again.stop()


def test_local_ray_labels_its_node_as_the_device():
    """`init_local_ray` (what the CLI does without --address): the local node is labelled device=local-cpu;
    further device names become resources (a node has one value per label)."""
    script = ("from raynas.hw.devices import device_nodes, init_local_ray\n"
              "init_local_ray(devices=['local-cpu', 'second'], num_cpus=1, include_dashboard=False)\n"
              "print(device_nodes())\n")
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == (
        "{'local-cpu': {'label': 1, 'resource': 0.0}, 'second': {'label': 0, 'resource': 1.0}}")


# ---- cluster/join_edge_worker.sh ------------------------------------------------------------------------
def _join(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """The join script with a HOME that holds no token; it must stop before `ray start` in these cases."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    base["HOME"] = str(tmp_path)
    return subprocess.run(["bash", str(REPO / "cluster" / "join_edge_worker.sh"), "127.0.0.1:1", "board-a"],
                          env={**base, **env}, capture_output=True, text=True, timeout=60)


def test_join_script_refuses_to_start_without_a_token(tmp_path):
    done = _join(tmp_path)
    assert done.returncode == 2 and "no cluster token" in done.stderr and "RAY_AUTH_TOKEN" in done.stderr
    done = _join(tmp_path, RAY_AUTH_TOKEN_PATH=str(tmp_path / "missing"))
    assert done.returncode == 2 and "RAY_AUTH_TOKEN_PATH" in done.stderr and "no token in that file" in done.stderr
    done = _join(tmp_path, RAY_AUTH_TOKEN="secret", RAY_AUTH_MODE="disabled")
    assert done.returncode == 2 and "RAY_AUTH_MODE=disabled" in done.stderr
    bad = subprocess.run(["bash", str(REPO / "cluster" / "join_edge_worker.sh"), "127.0.0.1:1", "no:colons"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)})
    assert bad.returncode == 2 and "DEVICE_NAME" in bad.stderr


def test_join_script_joins_a_token_cluster_as_a_labelled_device(tmp_path):
    """The script on a real token-authenticated head (separate `ray start` processes): given the token as a
    file, the board joins labelled device=board-x; a client without the token is refused."""
    import signal
    import socket
    import tempfile

    from cluster_helpers import HEAD_PORT_NAMES, WORKER_PORT_NAMES, free_port

    temp_dir = tempfile.mkdtemp(prefix="rjt", dir="/tmp")  # Ray's socket paths must stay short
    token = "raynas-test-token-" + os.urandom(8).hex()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", HOME=str(tmp_path))
    head_ports = {n: free_port() for n in HEAD_PORT_NAMES if n != "dashboard-port"}
    nodes = []

    def start(cmd, name, extra_env):
        with open(tmp_path / f"{name}.log", "wb") as log:
            nodes.append(subprocess.Popen(cmd, env={**env, **extra_env}, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))

    try:
        start(["ray", "start", "--block", "--head", "--num-cpus=0", "--include-dashboard=false",
               f"--temp-dir={temp_dir}", *(f"--{k}={v}" for k, v in head_ports.items())], "head",
              {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        deadline = time.monotonic() + 120
        while True:
            assert nodes[0].poll() is None, (tmp_path / "head.log").read_text()[-2000:]
            try:
                socket.create_connection(("127.0.0.1", head_ports["port"]), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the head did not come up"
                time.sleep(0.5)
        token_file = tmp_path / "raynas.token"
        token_file.write_text(token)
        address = f"127.0.0.1:{head_ports['port']}"
        start(["bash", str(REPO / "cluster" / "join_edge_worker.sh"), address, "board-x", "--block",
               f"--temp-dir={temp_dir}", *(f"--{k}={free_port()}" for k in WORKER_PORT_NAMES)],
              "board", {"RAY_AUTH_TOKEN_PATH": str(token_file)})
        script = ("import time, ray\nfrom raynas.hw.devices import device_nodes\n"
                  f"ray.init(address='{address}', log_to_driver=False)\n"
                  "deadline = time.monotonic() + 120\n"
                  "while 'board-x' not in device_nodes():\n"
                  "    assert time.monotonic() < deadline\n"
                  "    time.sleep(0.5)\n"
                  "print(device_nodes())\n")
        driver = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                                env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        assert driver.returncode == 0, driver.stderr[-2000:] + (tmp_path / "board.log").read_text()[-2000:]
        assert driver.stdout.strip().splitlines()[-1] == "{'board-x': {'label': 1, 'resource': 0.0}}"
        refused = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{address}')"],
                                 capture_output=True, text=True, timeout=120, env={**env, "RAY_AUTH_MODE": "disabled"})
        assert refused.returncode != 0
    finally:
        for node in reversed(nodes):  # these sessions only, never `ray stop`
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(node.pid, sig)
                    node.wait(timeout=30)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
        shutil.rmtree(temp_dir, ignore_errors=True)
