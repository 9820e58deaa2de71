"""Time one ONNX model with onnxruntime on the current node, following a `MeasurementProtocol`.

Runs on the device node (inside the profiler actor), so it needs only numpy and onnxruntime.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from raynas.hw.devices import DeviceSpec, MeasurementProtocol
from raynas.hw.energy import EnergyMeter, energy_meter


class RuntimeUnavailable(RuntimeError):
    """The device's execution provider is not installed on the node that advertises the device."""


@dataclass(frozen=True)
class Timing:
    """Statistics of the protocol's clock; `wall_median_ms` is elapsed time whatever the clock.

    With an energy meter (raynas.hw.energy), measured over the same timed series: `energy_mj` per call above
    idle, the idle power `idle_w` subtracted, and the series' length `energy_window_s`; None without one.
    """

    median_ms: float
    iqr_ms: float
    runs: int
    series: int  # how many timed series were needed to get a steady one
    warmup_runs: int
    wall_median_ms: float
    clock: str
    energy_mj: float | None = None
    idle_w: float | None = None
    energy_window_s: float | None = None

    @property
    def rel_iqr(self) -> float:
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else 0.0


def session_for(model: bytes | str, device: DeviceSpec, profile_prefix: str | None = None) -> ort.InferenceSession:
    """An inference session on the device's execution provider with fixed threads (and onnxruntime's
    per-node profiler writing to `profile_prefix`*.json, when given)."""
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
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(model, opts, providers=[p for p in wanted if p in available])


def time_session(session: ort.InferenceSession, feed: dict[str, np.ndarray],
                 protocol: MeasurementProtocol, meter: EnergyMeter | None = None) -> Timing:
    """Time-based warm-up, then series of `runs` timed calls until one is steady (see the protocol).

    With a `meter`, each series is also an energy window (lasting at least the meter's `min_window_s`), and
    the Timing of the series kept carries its energy per call; idle power is taken before the warm-up, with
    the device still at rest.
    """
    idle_w = meter.idle_w() if meter is not None else None
    min_s = protocol.min_run_s if meter is None else max(protocol.min_run_s, meter.min_window_s)
    warmup_runs = 0
    deadline = time.perf_counter() + protocol.warmup_s
    while warmup_runs < protocol.min_warmup_runs or time.perf_counter() < deadline:
        session.run(None, feed)
        warmup_runs += 1
    best: Timing | None = None
    for series in range(1, protocol.repeats + 1):
        energy = {}
        if meter is None:
            samples, wall = timed_calls(session, feed, protocol.runs, min_s, protocol.clock)
        else:
            with meter.window() as window:
                samples, wall = timed_calls(session, feed, protocol.runs, min_s, protocol.clock)
            energy = {"energy_mj": window.per_call(len(samples), idle_w), "idle_w": idle_w,
                      "energy_window_s": window.seconds}
        q1, median, q3 = np.percentile(samples, [25, 50, 75])
        timing = Timing(float(median), float(q3 - q1), len(samples), series, warmup_runs,
                        float(np.median(wall)), protocol.clock, **energy)
        if best is None or timing.rel_iqr < best.rel_iqr:
            best = timing
        if timing.rel_iqr <= protocol.max_rel_iqr:
            break
    return replace(best, series=series)


def timed_calls(session: ort.InferenceSession, feed: dict[str, np.ndarray], runs: int, min_s: float,
                clock: str) -> tuple[np.ndarray, np.ndarray]:
    """At least `runs` calls lasting at least `min_s` together: (samples on `clock`, wall samples), in ms."""
    wall, cpu = [], []
    deadline = time.perf_counter() + min_s
    while len(wall) < runs or time.perf_counter() < deadline:
        c0 = time.thread_time_ns()
        t0 = time.perf_counter_ns()
        session.run(None, feed)
        wall.append(time.perf_counter_ns() - t0)
        cpu.append(time.thread_time_ns() - c0)
    wall_ms = np.asarray(wall, dtype=float) / 1e6
    return (np.asarray(cpu, dtype=float) / 1e6 if clock == "thread" else wall_ms), wall_ms


def random_feed(session: ort.InferenceSession, input_shape: tuple[int, ...], seed: int = 0) -> dict:
    name = session.get_inputs()[0].name
    x = np.random.default_rng(seed).standard_normal(input_shape).astype(np.float32)
    return {name: x}


def _check_clock(device: DeviceSpec) -> None:
    if device.protocol.clock == "thread" and (device.runtime != "cpu" or device.threads != 1):
        raise ValueError(f"device '{device.name}': the thread clock needs runtime 'cpu' with 1 thread")


def measure_onnx(model: bytes | str, input_shape: tuple[int, ...], device: DeviceSpec) -> Timing:
    """Median/IQR latency (ms) of `model` at `input_shape` (batch = device.batch_size) on this node, and its
    energy per inference when the device declares a meter."""
    _check_clock(device)
    shape = (device.batch_size, *input_shape[1:])
    session = session_for(model, device)
    return time_session(session, random_feed(session, shape), device.protocol, energy_meter(device))


# ---- drift-proofing -------------------------------------------------------------------------------------
REFERENCE_SHAPE = (1, 16, 32, 32)


def reference_onnx() -> bytes:
    """The fixed model every device times beside what it measures, to know its speed at that moment.

    A small mix of the operators the spaces are made of (a dense 3x3 conv, a depthwise conv, a 1x1 conv,
    a token MLP with SiLU), so that it slows down with the device the way blocks do, and short (a few
    hundred microseconds on one core). Built from onnx.helper with seeded weights: identical bytes on
    every node, no torch needed on a board.
    """
    rng = np.random.default_rng(20261203)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
                                        ).astype(np.float32), name)

    c, h, w = REFERENCE_SHAPE[1:]
    inits = [weight("w_dense", 2 * c, c, 3, 3), weight("w_dw", 2 * c, 1, 3, 3), weight("w_pw", c, 2 * c, 1, 1),
             weight("w_up", c, 4 * c), weight("w_down", 4 * c, c),
             numpy_helper.from_array(np.array([0, c, h * w], dtype=np.int64), "tokens_shape")]
    node = helper.make_node
    nodes = [
        node("Conv", ["input", "w_dense"], ["a"], pads=[1, 1, 1, 1]), node("Relu", ["a"], ["b"]),
        node("Conv", ["b", "w_dw"], ["c"], pads=[1, 1, 1, 1], group=2 * c), node("Relu", ["c"], ["d"]),
        node("Conv", ["d", "w_pw"], ["e"]),
        node("Reshape", ["e", "tokens_shape"], ["f"]), node("Transpose", ["f"], ["g"], perm=[0, 2, 1]),
        node("MatMul", ["g", "w_up"], ["h"]), node("Sigmoid", ["h"], ["i"]), node("Mul", ["h", "i"], ["j"]),
        node("MatMul", ["j", "w_down"], ["k"]), node("ReduceMean", ["k"], ["output"], axes=[1], keepdims=0),
    ]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", c, h, w])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", c])
    graph = helper.make_graph(nodes, "raynas_reference", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


class ReferenceClock:
    """The device's speed now: the median time of `reference_runs` calls of `reference_onnx()`.

    A latency measured while the reference takes r ms is stated at a fixed reference speed b as
    latency * b / r (`at_reference_speed`). Timing the reference beside every model, in the same process
    with the same session settings and clock, cancels the host's drift between the moment a block is
    measured for the LUT and the moment a subnet is measured, minutes or days later.
    """

    def __init__(self, device: DeviceSpec):
        _check_clock(device)
        self.protocol = device.protocol
        self.session = session_for(reference_onnx(), device)
        self.feed = random_feed(self.session, (device.batch_size, *REFERENCE_SHAPE[1:]))
        for _ in range(max(self.protocol.min_warmup_runs, 3)):
            self.session.run(None, self.feed)

    def sample(self) -> np.ndarray:
        """One short series of reference calls (ms, on the protocol's clock)."""
        samples, _ = timed_calls(self.session, self.feed, self.protocol.reference_runs, 0.0, self.protocol.clock)
        return samples


def at_reference_speed(ms: float, reference_ms: float | None, baseline_ms: float | None) -> float:
    """`ms`, measured while the reference took `reference_ms`, as it would be at the reference speed
    `baseline_ms`; unchanged where either is unknown (a device measured without a reference)."""
    if not reference_ms or not baseline_ms or not np.isfinite(reference_ms) or not np.isfinite(baseline_ms):
        return ms
    return ms * baseline_ms / reference_ms


def node_times(model: bytes, input_shape: tuple[int, ...], device: DeviceSpec) -> tuple[Timing, list[dict[str, float]]]:
    """Time `model` by the protocol with onnxruntime's profiler on, and return with that timing each node's
    duration (ms) in every timed run, in execution order: `[{node: ms}, ...]`, one dict per run.

    The profiler's clock is elapsed time in whole microseconds; its own cost (a timestamp pair per node)
    is in the durations too, so the whole-model timing of a profiled session reads a little high.
    """
    _check_clock(device)
    shape = (device.batch_size, *input_shape[1:])
    with tempfile.TemporaryDirectory(prefix="raynas-profile-") as tmp:
        session = session_for(model, device, profile_prefix=str(Path(tmp) / "run"))
        timing = time_session(session, random_feed(session, shape), device.protocol, energy_meter(device))
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e["name"] == "model_run")
    runs = runs[-timing.runs:]  # the last series' runs: the timed ones the Timing describes
    per_run: list[dict[str, float]] = [{} for _ in runs]
    starts = np.array([start for start, _ in runs])
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if i >= 0 and e["ts"] <= runs[i][1]:
            name = e["name"][: -len("_kernel_time")]
            per_run[i][name] = per_run[i].get(name, 0.0) + e["dur"] / 1000.0
    return timing, per_run


_BLOCK_OF_NODE = re.compile(r"^/(\d+)/")


def block_times(per_run: list[dict[str, float]]) -> dict[int, float]:
    """Per block position of a subnet: the median over runs of its nodes' summed durations (ms).

    An exported subnet is an `nn.Sequential` of its blocks, so the exporter names every node of block i
    `/i/...`. Nodes onnxruntime creates or renames while optimising (layout reorders, fused activations
    such as `Gelu_token_7`) carry no block; the sequential executor runs them right after the node they
    were made from, so they are credited to the block of the last named node before them.
    """
    totals: dict[int, list[float]] = {}
    for nodes in per_run:
        run: dict[int, float] = {}
        block = 0
        for name, ms in nodes.items():  # execution order
            match = _BLOCK_OF_NODE.match(name)
            if match:
                block = int(match.group(1))
            run[block] = run.get(block, 0.0) + ms
        for block, ms in run.items():
            totals.setdefault(block, []).append(ms)
    return {block: float(np.median(v)) for block, v in totals.items()}


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
