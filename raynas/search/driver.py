"""The search loop: ask the algorithm, evaluate what the store does not know yet, persist, tell."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from raynas.search.algorithms.base import Record, SearchAlgorithm
from raynas.search.results import ResultStore
from raynas.space import Arch

# evaluate(archs) yields (arch_json, {"accuracy": ..., ...}) as each evaluation finishes, in any order
BatchEvaluator = Callable[[list[str]], Iterable[tuple[str, dict[str, Any]]]]


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_search(algorithm: SearchAlgorithm, evaluate: BatchEvaluator, store: ResultStore,
               progress: Callable[[str], None] = _progress) -> list[Record]:
    """Run `algorithm` to its budget. Archs already in `store` (a resumed run) are not re-evaluated.

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
        reused = len(archs) - len(todo)
        start = time.time()
        for done, (arch_json, result) in enumerate(_evaluated(evaluate, todo), 1):
            est = estimates[arch_json]
            record = {
                "arch": arch_json,
                "space": ctx.space.name,
                "algorithm": algorithm.name,
                "generation": generation,
                **{k: est[k] for k in ("latency_ms", "params", "macs")},
                "feasible": ctx.constraints.feasible(est),
                **result,
            }
            store.append(record)
            if done % max(1, len(todo) // 5) == 0 or done == len(todo):
                progress(f"[search] {algorithm.name} gen {generation}: {done}/{len(todo)} evaluated"
                         f" ({reused} from store), {time.time() - start:.1f}s")
        records = [store.get(a.to_json()) for a in archs]
        algorithm.tell(archs, records)
        asked.extend(records)
        generation += 1
    return asked


def _evaluated(evaluate: BatchEvaluator, todo: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    if todo:
        yield from evaluate(todo)


def estimate_fn(supernet, latency_model=None) -> Callable[[Arch], Record]:
    """Cheap per-arch estimates: analytic params/MACs and the latency model's prediction (cached)."""
    cache: dict[Arch, Record] = {}

    def estimate(arch: Arch) -> Record:
        if arch not in cache:
            cost = supernet.cost(arch)
            latency = latency_model.predict(arch) if latency_model is not None else float("nan")
            cache[arch] = {"params": int(cost["params"]), "macs": int(cost["macs"]), "latency_ms": float(latency)}
        return cache[arch]

    return estimate
