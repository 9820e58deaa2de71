"""Live latency: every search candidate exported and timed on the device's own node(s) while its accuracy
is evaluated (`search.latency.model: live`).

One profiler actor per board of the device (raynas.hw.remote.start_profilers): several boards of one kind
measure different candidates at once. The driver exports each candidate to ONNX (torch's exporter is not
thread-safe, so one export at a time) and hands it to the next free board; the accuracy evaluator actors
run meanwhile, so accuracy (GPUs/CPUs) and latency (boards) form one pipeline. A dead profiler is
replaced by `Profiler.measure` and only the candidate in flight is measured again.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from raynas import storage
from raynas.hw.lut import subnet_onnx
from raynas.hw.measure import at_reference_speed
from raynas.hw.remote import Profiler
from raynas.search.pareto import pareto_front
from raynas.search.results import ResultStore
from raynas.space import Arch


class LiveLatency:
    """`submit(arch_json)` -> a Future of the candidate's measured latency record (see `_record`)."""

    def __init__(self, supernet, profilers: list[Profiler], precision: str = "fp32"):
        self.supernet = supernet
        self.profilers = profilers
        self.precision = precision  # each board converts the FP32 export to it before timing
        self._free: queue.Queue[Profiler] = queue.Queue()
        for p in profilers:
            self._free.put(p)
        self._export_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=len(profilers), thread_name_prefix="raynas-live")

    def submit(self, arch_json: str) -> Future:
        return self._executor.submit(self._measure, arch_json)

    def _measure(self, arch_json: str) -> dict[str, Any]:
        with self._export_lock:
            model, shape = subnet_onnx(self.supernet, Arch.from_json(arch_json))
        profiler = self._free.get()
        try:
            (timing,) = profiler.measure([(arch_json, model, shape)], precision=self.precision)
        finally:
            self._free.put(profiler)
        return _record(timing)

    @property
    def replaced(self) -> int:
        return sum(p.replaced for p in self.profilers)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        for p in self.profilers:
            p.stop()


def _record(timing: dict[str, Any]) -> dict[str, Any]:
    """The fields a live measurement adds to a search record."""
    return {"latency_ms": timing["median_ms"], "latency_iqr_ms": timing["iqr_ms"],
            "latency_reference_ms": timing.get("reference_ms"), "latency_source": "measured",
            "measured_node": timing["node_id"], "measured_host": timing["hostname"],
            "measured_energy_mj": timing.get("energy_mj")}  # None: the board has no energy meter


class LiveCorrection:
    """A latency model kept honest by the device (`latency.correction`): after each generation the members of
    the current Pareto front not measured yet (at most `per_generation`) are measured live, and the model's
    calibration (kappa, epsilon) is refit on its calibration subnets plus every live measurement so far, so
    the next generation is predicted by the corrected model. At the end the front is measured until every
    member of it is (`finalize`): the front a user gets holds measured latencies, not predictions.

    Measurements are stored as they come (run_dir/live/, an append-only store like the evaluations'): a
    resumed search measures nothing again. Latencies are stated at the LUT's reference speed, like the
    predictions they are compared with (raynas.hw.measure.ReferenceClock); the raw figure is kept.
    """

    def __init__(self, live: LiveLatency, model, calibration: dict, run_dir: str, ctx, per_generation: int):
        self.live, self.model, self.per_generation = live, model, per_generation
        self.constraints, self.objectives = ctx.constraints, ctx.objectives
        # The subnets the model was calibrated on stay in every refit: live measurements add to them.
        self._base = ([ctx.space.validate(a) for a in calibration["archs"]], list(calibration["measured_ms"]))
        self.store = ResultStore(storage.join(run_dir, "live"))
        self.history: list[dict[str, Any]] = []
        self._refit(generation=-1)

    def after_generation(self, generation: int, records: list[dict[str, Any]]) -> None:
        # A resumed search replays its generations: one whose measurements are stored is not measured again.
        if not any(m["generation"] == generation for m in self.store.records()):
            front = self._front(records)
            self._measure([r for r in front if r["arch"] not in self.store][: self.per_generation], generation)
        self._refit(generation)

    def finalize(self, records: list[dict[str, Any]], rounds: int = 20) -> list[dict[str, Any]]:
        """`records` with the measured latency wherever one was measured, after measuring the front's
        unmeasured members until there are none (a measurement can move a member off the front and
        another onto it, hence rounds)."""
        for _ in range(rounds):
            todo = [r for r in self._front(self.apply(records)) if r["arch"] not in self.store]
            if not todo:
                break
            self._measure(todo, generation=-1)
        return self.apply(records)

    def apply(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for r in records:
            m = self.store.get(r["arch"])
            if m is not None:
                r = {**r, "latency_ms": m["measured_ms"], "latency_predicted_ms": r["latency_ms"],
                     "latency_source": "measured", "measured_node": m["measured_node"]}
                r["feasible"] = self.constraints.feasible(r)
            out.append(r)
        return out

    def _front(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return pareto_front([r for r in records if r["feasible"]], self.objectives)

    def _measure(self, records: list[dict[str, Any]], generation: int) -> None:
        futures = {r["arch"]: (r, self.live.submit(r["arch"])) for r in records}
        for arch, (record, future) in futures.items():
            m = future.result()
            reference = m["latency_reference_ms"]
            self.store.append({
                "arch": arch, "generation": generation,
                "measured_ms": at_reference_speed(m["latency_ms"], reference, self.model.baseline_ms),
                "measured_raw_ms": m["latency_ms"], "reference_ms": reference,
                "predicted_ms": record["latency_ms"], "measured_node": m["measured_node"],
                "calibration_slope": self.model.calibration.slope,
                "calibration_intercept": self.model.calibration.intercept,
            })

    def _refit(self, generation: int) -> None:
        measured = self.store.records()
        archs = self._base[0] + [Arch.from_json(m["arch"]) for m in measured]
        self.model.calibrate(archs, self._base[1] + [m["measured_ms"] for m in measured])
        self.history.append({"generation": generation, "live_measured": len(measured),
                             "slope": self.model.calibration.slope, "intercept": self.model.calibration.intercept})

