"""The search loop: ask the algorithm, evaluate what the store does not know yet, persist, tell."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from raynas.search.algorithms.base import Record, SearchAlgorithm
from raynas.search.live import LiveLatency
from raynas.search.results import ResultStore
from raynas.space import Arch

# What a stored record takes from the estimate (energy_mj only where the search asks for energy).
ESTIMATED = ("latency_ms", "params", "macs", "energy_mj")
# evaluate(archs) yields (arch_json, {"accuracy": ..., ...}) as each evaluation finishes, in any order
BatchEvaluator = Callable[[list[str]], Iterable[tuple[str, dict[str, Any]]]]


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_search(algorithm: SearchAlgorithm, evaluate: BatchEvaluator, store: ResultStore,
               progress: Callable[[str], None] = _progress, live: LiveLatency | None = None,
               after_generation: Callable[[int, list[Record]], None] | None = None) -> list[Record]:
    """Run `algorithm` to its budget. Archs already in `store` (a resumed run) are not re-evaluated.

    `live`: every new candidate's latency is measured on the device while its accuracy is evaluated, and
    replaces the estimate (feasibility included); a record is stored once both are in.
    `after_generation(generation, records asked so far)`: e.g. correct the latency model (LiveCorrection).
    Returns the records of every arch the algorithm asked for, in ask order.
    """
    ctx = algorithm.ctx
    asked: list[Record] = []
    generation = 0
    while not algorithm.done:
        archs = algorithm.ask()
        if not archs:
            progress(f"[search] {algorithm.name}: no new candidates left; stopping early")
            break
        todo = list(dict.fromkeys(a.to_json() for a in archs if a.to_json() not in store))
        estimates = {a.to_json(): ctx.estimate(a) for a in archs}
        measuring = {a: live.submit(a) for a in todo} if live is not None else {}
        reused = len(archs) - len(todo)
        start = time.time()
        evaluated: dict[str, dict[str, Any]] = {}  # accuracy in, latency (live) maybe not yet

        for done, (arch_json, result) in enumerate(_evaluated(evaluate, todo), 1):
            evaluated[arch_json] = result
            _store_ready(store, algorithm, generation, estimates, evaluated, measuring, wait=False)
            if done % max(1, len(todo) // 5) == 0 or done == len(todo):
                progress(f"[search] {algorithm.name} gen {generation}: {done}/{len(todo)} evaluated"
                         f" ({reused} from store), {time.time() - start:.1f}s")
        _store_ready(store, algorithm, generation, estimates, evaluated, measuring, wait=True)
        records = [store.get(a.to_json()) for a in archs]
        algorithm.tell(archs, records)
        asked.extend(records)
        if after_generation is not None:
            after_generation(generation, asked)
        generation += 1
    return asked


def _store_ready(store: ResultStore, algorithm: SearchAlgorithm, generation: int, estimates: dict[str, Record],
                 evaluated: dict[str, dict[str, Any]], measuring: dict[str, Any], wait: bool) -> None:
    """Store (and drop from `evaluated`) each evaluation whose live latency, if any, is in; all of them,
    waiting for their measurements, when `wait`."""
    for arch_json in [a for a in evaluated if wait or a not in measuring or measuring[a].done()]:
        measured = measuring[arch_json].result() if arch_json in measuring else None
        store.append(_record(algorithm, generation, arch_json, estimates[arch_json], evaluated.pop(arch_json),
                             measured))


def _record(algorithm: SearchAlgorithm, generation: int, arch_json: str, estimate: Record,
            result: dict[str, Any], measured: dict[str, Any] | None) -> Record:
    """The stored record of one evaluation; a live measurement replaces the estimated latency (kept as
    `latency_predicted_ms`) and decides feasibility."""
    ctx, live_fields = algorithm.ctx, {}
    if measured is not None:
        live_fields = {**measured, "latency_predicted_ms": estimate["latency_ms"]}
        estimate = {**estimate, "latency_ms": live_fields.pop("latency_ms")}
    return {"arch": arch_json, "space": ctx.space.name, "algorithm": algorithm.name, "generation": generation,
            **{k: estimate[k] for k in ESTIMATED if k in estimate},
            "feasible": ctx.constraints.feasible(estimate), **live_fields, **result}


def _evaluated(evaluate: BatchEvaluator, todo: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    if todo:
        yield from evaluate(todo)


def estimate_fn(supernet, latency_model=None, energy_model=None) -> Callable[[Arch], Record]:
    """Cheap per-arch estimates: analytic params/MACs (cached), the latency model's prediction (asked
    each time: a live-corrected model changes between generations) and, given an `energy_model`
    (raynas.hw.energy_model, when the search asks for energy), the predicted energy per inference (cached)."""
    cache: dict[Arch, Record] = {}

    def estimate(arch: Arch) -> Record:
        if arch not in cache:
            cost = supernet.cost(arch)
            cache[arch] = {"params": int(cost["params"]), "macs": int(cost["macs"])}
            if energy_model is not None:
                cache[arch]["energy_mj"] = float(energy_model.predict(arch))
        latency = latency_model.predict(arch) if latency_model is not None else float("nan")
        return {**cache[arch], "latency_ms": float(latency)}

    return estimate
