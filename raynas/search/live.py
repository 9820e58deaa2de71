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

from raynas.hw.lut import subnet_onnx
from raynas.hw.remote import Profiler
from raynas.space import Arch


class LiveLatency:
    """`submit(arch_json)` -> a Future of the candidate's measured latency record (see `_record`)."""

    def __init__(self, supernet, profilers: list[Profiler]):
        self.supernet = supernet
        self.profilers = profilers
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
            (timing,) = profiler.measure([(arch_json, model, shape)])
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
            "measured_node": timing["node_id"], "measured_host": timing["hostname"]}
