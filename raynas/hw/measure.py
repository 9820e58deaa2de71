"""Time one ONNX model with onnxruntime on the current node, following a `MeasurementProtocol`.

Runs on the device node (inside the profiler actor), so it needs only numpy and onnxruntime.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from raynas.hw.devices import DeviceSpec, MeasurementProtocol


class RuntimeUnavailable(RuntimeError):
    """The device's execution provider is not installed on the node that advertises the device."""


@dataclass(frozen=True)
class Timing:
    """Statistics of the protocol's clock; `wall_median_ms` is elapsed time whatever the clock."""

    median_ms: float
    iqr_ms: float
    runs: int
    series: int  # how many timed series were needed to get a steady one
    warmup_runs: int
    wall_median_ms: float
    clock: str

    @property
    def rel_iqr(self) -> float:
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else 0.0


def session_for(model: bytes | str, device: DeviceSpec) -> ort.InferenceSession:
    """An inference session on the device's execution provider with fixed threads."""
    available = ort.get_available_providers()
    wanted = device.providers
    if wanted[0] not in available:
        raise RuntimeUnavailable(
            f"device '{device.name}': runtime '{device.runtime}' needs {wanted[0]}, but onnxruntime on this "
            f"node offers {available}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = device.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # Random weights can drive activations into denormals, which real (trained) models rarely hit and
    # which are 10-100x slower on x86: flush them so timings reflect the architecture, not the weights.
    opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    return ort.InferenceSession(model, opts, providers=[p for p in wanted if p in available])


def time_session(session: ort.InferenceSession, feed: dict[str, np.ndarray],
                 protocol: MeasurementProtocol) -> Timing:
    """Time-based warm-up, then series of `runs` timed calls until one is steady (see the protocol)."""
    warmup_runs = 0
    deadline = time.perf_counter() + protocol.warmup_s
    while warmup_runs < protocol.min_warmup_runs or time.perf_counter() < deadline:
        session.run(None, feed)
        warmup_runs += 1
    best: Timing | None = None
    thread_clock = protocol.clock == "thread"
    for series in range(1, protocol.repeats + 1):
        wall, cpu = [], []
        deadline = time.perf_counter() + protocol.min_run_s
        while len(wall) < protocol.runs or time.perf_counter() < deadline:
            c0 = time.thread_time_ns()
            t0 = time.perf_counter_ns()
            session.run(None, feed)
            wall.append(time.perf_counter_ns() - t0)
            cpu.append(time.thread_time_ns() - c0)
        samples = np.asarray(cpu if thread_clock else wall, dtype=float) / 1e6
        q1, median, q3 = np.percentile(samples, [25, 50, 75])
        timing = Timing(float(median), float(q3 - q1), len(samples), series, warmup_runs,
                        float(np.median(wall) / 1e6), protocol.clock)
        if best is None or timing.rel_iqr < best.rel_iqr:
            best = timing
        if timing.rel_iqr <= protocol.max_rel_iqr:
            break
    return replace(best, series=series)


def random_feed(session: ort.InferenceSession, input_shape: tuple[int, ...], seed: int = 0) -> dict:
    name = session.get_inputs()[0].name
    x = np.random.default_rng(seed).standard_normal(input_shape).astype(np.float32)
    return {name: x}


def measure_onnx(model: bytes | str, input_shape: tuple[int, ...], device: DeviceSpec) -> Timing:
    """Median/IQR latency (ms) of `model` at `input_shape` (batch = device.batch_size) on this node."""
    if device.protocol.clock == "thread" and (device.runtime != "cpu" or device.threads != 1):
        raise ValueError(f"device '{device.name}': the thread clock needs runtime 'cpu' with 1 thread")
    shape = (device.batch_size, *input_shape[1:])
    session = session_for(model, device)
    return time_session(session, random_feed(session, shape), device.protocol)


def identity_onnx(input_shape: tuple[int, ...]) -> bytes:
    """The cheapest model with this input: timing it gives onnxruntime's fixed per-call overhead
    (feed conversion, output allocation, Python binding), which a per-block LUT would otherwise count once
    per block although an end-to-end run pays it once."""
    dims = ["batch", *input_shape[1:]]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, dims)
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "identity", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
