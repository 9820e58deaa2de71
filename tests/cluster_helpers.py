"""Real multi-node Ray clusters for tests: separate `ray start --block` processes on this machine.

Each node runs in its own process session with its own ports (several raylets share one host here the way
they would share none in production); `stop()` ends exactly those sessions, never `ray stop` (which would
stop every Ray instance on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HEAD_PORT_NAMES = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
                   "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
                   "node-manager-port", "object-manager-port")
WORKER_PORT_NAMES = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                     "metrics-export-port", "node-manager-port", "object-manager-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    """The environment of the nodes and of `ray job submit`: this process's (so the S3 variables of the
    `s3_server` fixture reach every node), without a RAY_ADDRESS that would join another cluster."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A private cluster on loopback for one test: no token to provision (CI machines have none).
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


class RayCluster:
    """A head (dashboard = job server) and any number of worker nodes, each a `ray start --block` process."""

    def __init__(self, head_cpus: int = 2, head_resources: dict[str, float] | None = None,
                 head_labels: dict[str, str] | None = None):
        # Short temp dir: Ray's socket paths must fit in 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="rnc", dir="/tmp")
        self.ports = {name: free_port() for name in HEAD_PORT_NAMES}
        self.address = f"127.0.0.1:{self.ports['port']}"
        self.dashboard_url = f"http://127.0.0.1:{self.ports['dashboard-port']}"
        self.nodes: list[subprocess.Popen] = []
        self._logs: list = []
        args = ["--head", f"--num-cpus={head_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--temp-dir={self.temp_dir}", *(f"--{k}={v}" for k, v in self.ports.items())]
        self._start("head", args, head_resources, head_labels)
        self._wait_for_dashboard()

    def _start(self, name: str, args: list[str], resources, labels) -> subprocess.Popen:
        cmd = ["ray", "start", "--block", "--disable-usage-stats", *args]
        if resources:
            cmd += ["--resources", json.dumps(resources)]
        if labels:
            cmd += ["--labels", ",".join(f"{k}={v}" for k, v in labels.items())]
        log = open(Path(self.temp_dir) / f"{name}.log", "wb")
        self._logs.append(log)
        node = subprocess.Popen(cmd, env=ray_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(node)
        return node

    def log(self, name: str) -> str:
        return (Path(self.temp_dir) / f"{name}.log").read_text(errors="replace")[-3000:]

    def _wait_for_dashboard(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.nodes[0].poll() is None, f"ray start --head exited: {self.log('head')}"
            assert time.monotonic() < deadline, f"the Ray dashboard did not come up within {timeout_s:.0f} s"
            try:
                urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:
                return  # the server answers
            except OSError:
                time.sleep(1)

    def add_worker(self, name: str, num_cpus: int = 2, resources: dict[str, float] | None = None,
                   labels: dict[str, str] | None = None, attempts: int = 3) -> subprocess.Popen:
        """Start a worker node and wait until it has started. Ray gives a raylet a fixed 30 s to register;
        on a loaded 2-core machine that can pass, so a node that timed out is started again."""
        for attempt in range(1, attempts + 1):
            ports = {n: free_port() for n in WORKER_PORT_NAMES}
            # A temp dir of its own, as on a separate machine: nodes sharing one would share (and garbage-
            # collect) each other's runtime-env files, such as the job's unpacked working directory.
            node_temp = tempfile.mkdtemp(prefix="n", dir=self.temp_dir)
            args = [f"--address={self.address}", f"--num-cpus={num_cpus}", f"--temp-dir={node_temp}",
                    *(f"--{k}={v}" for k, v in ports.items())]
            log_name = name if attempt == 1 else f"{name}-{attempt}"
            node = self._start(log_name, args, resources, labels)
            deadline = time.monotonic() + 120
            while node.poll() is None and time.monotonic() < deadline:
                if "Ray runtime started" in (Path(self.temp_dir) / f"{log_name}.log").read_text(errors="replace"):
                    return node
                time.sleep(0.5)
            self.nodes.remove(node)
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait(timeout=30)
        raise AssertionError(f"worker node {name} did not start in {attempts} attempts: {self.log(name)}")

    def wait_for_nodes(self, count: int, timeout_s: float = 120) -> None:
        """Wait until `count` nodes are alive, asking the head through a short-lived driver."""
        script = ("import ray, time, sys\n"
                  f"ray.init(address='{self.address}', log_to_driver=False)\n"
                  f"deadline = time.monotonic() + {timeout_s}\n"
                  f"while sum(n['Alive'] for n in ray.nodes()) < {count}:\n"
                  "    assert time.monotonic() < deadline, 'nodes did not join'\n"
                  "    time.sleep(0.5)\n")
        done = subprocess.run(["python", "-c", script], env=ray_env(), capture_output=True, text=True,
                              timeout=timeout_s + 60)
        logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                         for p in sorted(Path(self.temp_dir).glob("*.log")))
        assert done.returncode == 0, done.stderr[-2000:] + logs

    def kill_node(self, node: subprocess.Popen) -> None:
        """SIGKILL a node's whole process session (raylet, its workers): the node is gone, as a lost machine."""
        try:
            os.killpg(node.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        node.wait(timeout=30)

    def stop(self) -> None:
        # Workers first, then the head: SIGTERM (`ray start --block` stops its children), then SIGKILL.
        for node in reversed(self.nodes):
            for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
                try:
                    os.killpg(node.pid, sig)
                    node.wait(timeout=wait_s)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
        for log in self._logs:
            log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
