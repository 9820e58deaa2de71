"""Measurement on device nodes: one Ray actor per device, pinned by the `device:<name>` resource.

The actor asks for the whole unit of `device:<name>` (each node advertises one), so at most one
profiler runs per device at a time and measurements never overlap on a board. ONNX export happens on
the driver (it needs torch); the device node receives ONNX bytes and needs only onnxruntime.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import ray

from raynas.hw.devices import DeviceNotPresent, DeviceSpec, ensure_device_present
from raynas.hw.measure import measure_onnx


class DeviceProfiler:
    """Times ONNX models on the node it was placed on. Use `start_profiler` to create one."""

    def __init__(self, device: dict):
        self.device = DeviceSpec.from_dict(device)

    def node(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {
            "device": self.device.name,
            "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "onnxruntime": ort.__version__,
            "providers": ort.get_available_providers(),
        }

    def measure(self, items: Iterable[tuple[str, Any, tuple[int, ...]]]) -> list[dict[str, Any]]:
        """Time each `(tag, onnx_bytes, input_shape)`; returns one record per item, in order."""
        node = ray.get_runtime_context().get_node_id()
        host = socket.gethostname()
        records = []
        for tag, model, input_shape in items:
            t0 = time.perf_counter()
            if isinstance(model, ray.ObjectRef):  # shared by several devices' calls, fetched here
                model = ray.get(model)
            timing = measure_onnx(model, tuple(input_shape), self.device)
            records.append({
                "tag": tag, "median_ms": timing.median_ms, "iqr_ms": timing.iqr_ms, "runs": timing.runs,
                "series": timing.series, "warmup_runs": timing.warmup_runs, "clock": timing.clock,
                "wall_median_ms": timing.wall_median_ms,
                "wall_s": time.perf_counter() - t0, "node_id": node, "hostname": host,
            })
        return records


_RemoteProfiler = ray.remote(DeviceProfiler)


@dataclass
class Profiler:
    """A started profiler actor and where it landed (`node`: node_id, hostname, onnxruntime, providers)."""

    device: DeviceSpec
    actor: Any
    node: dict[str, Any]

    def stop(self) -> None:
        ray.kill(self.actor)


def start_profiler(device: DeviceSpec, ready_timeout_s: float = 120.0) -> Profiler:
    """A profiler actor on the node advertising `device`, ready to measure.

    Fails within seconds with `DeviceNotPresent` when no node advertises the device, instead of leaving
    an actor pending forever; `ready_timeout_s` bounds the wait for the actor to start once it can be placed
    (a node that leaves at that moment).
    """
    ensure_device_present(device.name)
    # num_cpus=0: the device resource already serialises work on the device, and a board may advertise
    # fewer Ray CPUs than the runtime's threads (that would make the actor unschedulable).
    actor = _RemoteProfiler.options(resources={device.resource: 1}, num_cpus=0).remote(device.to_dict())
    node_ref = actor.node.remote()
    ready, _ = ray.wait([node_ref], timeout=ready_timeout_s)
    if not ready:
        ray.kill(actor)
        raise DeviceNotPresent(f"device '{device.name}': its profiler did not start within {ready_timeout_s:.0f} s "
                               f"(did the node advertising '{device.resource}' leave the cluster?)")
    return Profiler(device, actor, ray.get(node_ref))
