"""Measurement on device nodes: one Ray actor per device, placed by the node label `device=<name>`
(or, on a board that only advertises it, the resource `device:<name>`; see raynas.hw.devices).

At most one profiler measures on a device at a time, cluster-wide, so measurements never overlap on a
board: see `start_profiler`. ONNX export happens on the driver (it needs torch); the device node receives
FP32 ONNX bytes (or object refs to them) and needs only onnxruntime: it converts them to the precision it
is asked to measure at itself (raynas.hw.precision), so one export serves every precision and device.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.exceptions import ActorAlreadyExistsError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raynas.hw.devices import DeviceNotPresent, DeviceSpec, ensure_device_present, labelled_nodes
from raynas.hw.in_context import scope_nodes
from raynas.hw.measure import ReferenceClock, Timing, block_times, measure_onnx, node_times
from raynas.hw.precision import convert, size_mb


class DeviceProfiler:
    """Times ONNX models on the node it was placed on. Use `start_profiler` to create one."""

    def __init__(self, device: dict):
        import onnxruntime as ort

        self.device = DeviceSpec.from_dict(device)
        self._reference: ReferenceClock | None = None  # built on first use, kept: one session per actor
        # Converting to int8 runs onnxruntime's quantizer once per model: its calibration sessions' warnings
        # would repeat for each of a LUT's hundreds of blocks (raynas.hw.precision quiets its Python ones).
        ort.set_default_logger_severity(3)

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

    def measure(self, items: Iterable[tuple[str, Any, tuple[int, ...]]], per_block: bool = False,
                precision: str = "fp32") -> list[dict[str, Any]]:
        """Time each `(tag, onnx_bytes, input_shape)`; returns one record per item, in order.

        `precision`: each FP32 model is converted to it here, on the device, before timing
        (raynas.hw.precision.convert with seeded calibration inputs: activation ranges do not change which
        ops run, so they do not change latency); `size_mb` is the converted model's size.

        `per_block`: each model is an exported subnet, profiled per node, and its record also holds
        `block_ms`, {block position: ms} (raynas.hw.measure.block_times), and with an energy meter `block_mj`,
        {block position: mJ} (see `_per_block`). A converted subnet's added nodes are first given the block
        scope of the node they serve (raynas.hw.in_context.scope_nodes).

        With an energy meter (`energy` in devices.yaml), each record has `energy_mj` per call above idle,
        `idle_w` and `energy_window_s`, measured over the very series the latency comes from; None without one.

        With a reference (`protocol.reference_runs` > 0) a series of reference calls runs before the first
        model and after each one; every record of the call gets the median of all of them, `reference_ms`:
        the device's speed over the few seconds the call lasts, steadier than one short series.
        """
        self.device.check_precision(precision, "precision")
        node = ray.get_runtime_context().get_node_id()
        host = socket.gethostname()
        reference = self._reference_clock()
        reference_samples = [reference.sample()] if reference else []
        records = []
        for tag, model, input_shape in items:
            t0 = time.perf_counter()
            if isinstance(model, ray.ObjectRef):  # shared by several devices' calls, fetched here
                model = ray.get(model)
            model = convert(model, precision)
            if per_block and precision != "fp32":
                model = scope_nodes(model)
            if per_block:
                timing, per_run = node_times(model, tuple(input_shape), self.device)
            else:
                timing, per_run = measure_onnx(model, tuple(input_shape), self.device), None
            if reference:
                reference_samples.append(reference.sample())
            records.append({
                "tag": tag, "precision": precision, "size_mb": size_mb(model),
                "median_ms": timing.median_ms, "iqr_ms": timing.iqr_ms, "runs": timing.runs,
                "series": timing.series, "warmup_runs": timing.warmup_runs, "clock": timing.clock,
                "wall_median_ms": timing.wall_median_ms,
                # over the same timed series, above idle; None when the device declares no meter
                "energy_mj": timing.energy_mj, "idle_w": timing.idle_w, "energy_window_s": timing.energy_window_s,
                "wall_s": time.perf_counter() - t0, "node_id": node, "hostname": host, "measured_at": time.time(),
                **(_per_block(block_times(per_run), timing) if per_block else {}),
            })
        reference_ms = float(np.median(np.concatenate(reference_samples))) if reference_samples else None
        for record in records:
            record["reference_ms"] = reference_ms
        return records

    def _reference_clock(self) -> ReferenceClock | None:
        if self.device.protocol.reference_runs == 0:
            return None
        if self._reference is None:
            self._reference = ReferenceClock(self.device)
        return self._reference


def _per_block(block_ms: dict[int, float], timing: Timing) -> dict[str, dict[int, float]]:
    """`block_ms`, and `block_mj` when energy was measured.

    A meter sees the whole subnet, never one node, so a block's energy is the subnet's power above idle over
    its timed window (energy per call x calls / window length) times the block's time: each block is charged
    its share of the time, at the subnet's mean power. What a call spends outside the nodes (feeds, outputs,
    the binding) is in no block, as for latency. Energy-hungry operators (a dense conv against a memory-bound
    depthwise one) draw more than the mean, which this share cannot see; isolated LUTs measure each block's
    own energy.
    """
    if timing.energy_mj is None:
        return {"block_ms": block_ms}
    watts = timing.energy_mj * timing.runs / (timing.energy_window_s * 1000.0)
    return {"block_ms": block_ms, "block_mj": {block: watts * ms for block, ms in block_ms.items()}}


_RemoteProfiler = ray.remote(DeviceProfiler)

# Profilers are named actors in one namespace shared by every driver (a job's own namespace is anonymous).
PROFILER_NAMESPACE = "raynas"


def profiler_name(device: str, node_id: str | None = None) -> str:
    return f"profiler:{device}" if node_id is None else f"profiler:{device}@{node_id}"


@dataclass(frozen=True)
class MeasureCall:
    """A `DeviceProfiler.measure` call in flight: its result, the actor it went to and what it asked."""

    ref: ray.ObjectRef
    actor: Any
    items: list
    per_block: bool
    precision: str = "fp32"


@dataclass
class Profiler:
    """A started profiler actor and where it landed (`node`: node_id, hostname, onnxruntime, providers)."""

    device: DeviceSpec
    actor: Any
    node: dict[str, Any]
    replaced: int = 0  # actors started in place of one that died
    pinned_node: str | None = None  # one of several boards of the device: this node, always

    def submit(self, items: list[tuple[str, Any, tuple[int, ...]]], per_block: bool = False,
               precision: str = "fp32") -> MeasureCall:
        """Start timing `(tag, FP32 onnx_bytes or its object ref, input_shape)` items at `precision`;
        `collect` the result."""
        return MeasureCall(self.actor.measure.remote(items, per_block, precision), self.actor, items, per_block,
                           precision)

    def collect(self, call: MeasureCall, replacements: int = 2) -> list[dict[str, Any]]:
        """The records of `call`. When its actor died meanwhile (its process or node was killed), a new
        actor replaces it (once: a call sent to an actor already replaced only goes to the new one) and
        measures the call's items again, up to `replacements` times: what earlier calls returned is the
        caller's and stays, only this call's items are measured anew."""
        for _ in range(replacements):
            try:
                return ray.get(call.ref)
            except RayActorError:
                if call.actor is self.actor:
                    self.replace()
                call = self.submit(call.items, call.per_block, call.precision)
        return ray.get(call.ref)

    def measure(self, items: list, per_block: bool = False, precision: str = "fp32") -> list[dict[str, Any]]:
        return self.collect(self.submit(items, per_block, precision))

    def replace(self) -> None:
        """Start a fresh actor for the device in place of this one. A dead actor is never reused (Ray does
        not restart it: it may have died with its board), and the new one takes over its name, the device's
        lock, as soon as Ray has seen the old one die (`start_profiler` waits for that)."""
        ray.kill(self.actor, no_restart=True)  # a no-op on a dead actor; ends one that only stopped answering
        fresh = start_profiler(self.device, node_id=self.pinned_node)
        self.actor, self.node = fresh.actor, fresh.node
        self.replaced += 1

    def stop(self) -> None:
        """Kill the actor and wait (briefly) until its name is free for the device's next profiler."""
        ray.kill(self.actor, no_restart=True)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            try:
                ray.get_actor(profiler_name(self.device.name, self.pinned_node), namespace=PROFILER_NAMESPACE)
            except ValueError:
                return
            time.sleep(0.05)


def start_profilers(device: DeviceSpec) -> list[Profiler]:
    """A profiler on every board of the device (each node labelled `device=<name>`), to measure in parallel;
    one, placed as `start_profiler` places it, when the device has a single node (or only its resource)."""
    nodes = labelled_nodes(device.name)
    if len(nodes) <= 1:
        return [start_profiler(device)]
    profilers: list[Profiler] = []
    try:
        for node_id in nodes:
            profilers.append(start_profiler(device, node_id=node_id))
    except BaseException:
        for p in profilers:
            p.stop()
        raise
    return profilers


def start_profiler(device: DeviceSpec, ready_timeout_s: float = 120.0, node_id: str | None = None) -> Profiler:
    """A profiler actor on the device's node (label `device=<name>`, else resource `device:<name>`), ready;
    with `node_id`, on that node (one of several boards of the device, see `start_profilers`).

    Fails within seconds with `DeviceNotPresent` when no node is the device, instead of leaving an actor
    pending forever. `ready_timeout_s` bounds the wait for the device to be free (another driver measuring
    on it) and for the actor to start once it can be placed (a node that leaves at that moment).
    """
    options = ensure_device_present(device.name)
    # Serialisation: a label, unlike the resource, is not consumed by the actor placed with it, so the
    # label alone would let two drivers measure on one board at once and each would time the other's load.
    # The actor's name (one per device, in a namespace shared by every driver) is the lock instead: a second
    # profiler of the device waits here until the first is stopped or its driver exits (Ray frees the name
    # when the actor dies). One mechanism for labelled and resource-only boards; the resource fallback is
    # consumed as well. num_cpus=0: a board may offer fewer Ray CPUs (often 0) than the runtime's threads.
    # A board among several has its own lock (its node id in the name) and is reached by node affinity.
    name = profiler_name(device.name, node_id)
    if node_id is not None:
        options = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}
    deadline = time.monotonic() + ready_timeout_s
    while True:
        try:
            actor = _RemoteProfiler.options(name=name, namespace=PROFILER_NAMESPACE, num_cpus=0, **options
                                            ).remote(device.to_dict())
            break
        except ActorAlreadyExistsError:
            if time.monotonic() >= deadline:
                raise DeviceNotPresent(
                    f"device '{device.name}': busy; another profiler (actor '{name}' in namespace "
                    f"'{PROFILER_NAMESPACE}') measured on it for the whole {ready_timeout_s:.0f} s wait; "
                    "measurements on a device never overlap, run again when it is done") from None
            time.sleep(0.5)
    node_ref = actor.node.remote()
    ready, _ = ray.wait([node_ref], timeout=max(deadline - time.monotonic(), 10.0))
    if not ready:
        ray.kill(actor)
        how = f"resource {device.resource}" if "resources" in options else f"label {device.label}"
        raise DeviceNotPresent(f"device '{device.name}': its profiler did not start within {ready_timeout_s:.0f} s "
                               f"(did the node with {how} leave the cluster?)")
    return Profiler(device, actor, ray.get(node_ref), pinned_node=node_id)
