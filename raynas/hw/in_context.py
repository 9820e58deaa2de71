"""LUT entries measured in context: whole subnets profiled per node by onnxruntime, split into their blocks.

Timing each block in its own session (`build_lut(method="isolated")`) measures it with a cold cache and an
input nobody else wrote; here a few sampled subnets that together contain every wanted block are each run
whole with onnxruntime's profiler on, and every node's time is credited to the block it belongs to. One
run times all ~30 blocks of a subnet at once, in the cache state and with the neighbours they have in a
real subnet, and a block is seen in `appearances` different subnets (its entry: the median over them).

The crediting itself happens on the device node (raynas.hw.measure.block_times, by each node's `/i/`
scope); here the driver plans which subnets to profile and turns their per-block times into LUT records.
A subnet converted to another precision on the device gets nodes the exporter never named: onnxruntime's
quantizer names QuantizeLinear/DequantizeLinear nodes after the tensor they convert, which is scoped for
activations (`/3/conv/Conv_output_0_QuantizeLinear`) but not for weights (`onnx::Conv_126_DequantizeLinear`,
`3.2.weight_DequantizeLinear`), and the FP16 converter adds casts at the graph's edges. A weight's node runs
right before its consumer, i.e. after the previous block's last node, so the execution-order rule would
credit it to the wrong block; `scope_nodes` names such nodes after the block of the node they feed first.
That function runs on the device node, so this module imports neither torch nor the supernets at run time.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

if TYPE_CHECKING:
    from raynas.space import Arch
    from raynas.supernets.base import Supernet


@dataclass
class Plan:
    """Subnets to profile so that every wanted key appears in `appearances` of them (or as often as the
    sampled pool allows); `uncovered` keys appear in none and are left to isolated measurement."""

    archs: list[Arch]
    keys: dict[str, list[str]]  # arch json -> its blocks' keys, in order
    uncovered: list[str]

    def contexts(self) -> dict[str, list[tuple[str, int]]]:
        """Per key: the (subnet, block position) places it is measured at."""
        places: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for arch in self.archs:
            tag = arch.to_json()
            for position, key in enumerate(self.keys[tag]):
                places[key].append((tag, position))
        return places


def plan_subnets(supernet: Supernet, wanted: Iterable[str], seed: int = 0, appearances: int = 2,
                 pool: int = 400, known: Sequence[tuple[Arch, list[str]]] = ()) -> Plan:
    """Greedy set cover over a pool of sampled subnets (plus `known` ones, with their keys): repeatedly the
    subnet that contains the most wanted keys still short of `appearances`, until none gains anything."""
    space = supernet.space
    need = {k: appearances for k in wanted}
    candidates: dict[str, tuple[Arch, list[str]]] = {a.to_json(): (a, keys) for a, keys in known}
    rng = np.random.default_rng([seed, 3])
    for arch in [space.min_arch(), space.max_arch()] + [space.sample(rng) for _ in range(pool)]:
        tag = arch.to_json()
        if tag not in candidates:
            candidates[tag] = (arch, [b.key for b in supernet.blocks(arch)])
    chosen: list[Arch] = []
    while True:
        gains = {tag: sum(1 for k in set(keys) if need.get(k, 0) > 0) for tag, (_, keys) in candidates.items()}
        best = max(gains, key=gains.get, default=None)
        if best is None or gains[best] == 0:
            break
        arch, keys = candidates.pop(best)
        chosen.append(arch)
        for k in set(keys):
            if need.get(k, 0) > 0:
                need[k] -= 1
    keys = {a.to_json(): [b.key for b in supernet.blocks(a)] for a in chosen}
    covered = {k for ks in keys.values() for k in ks}
    return Plan(chosen, keys, [k for k in need if k not in covered])


def rows_in_context(plan: Plan, records: dict[str, dict], wanted: Iterable[str]) -> dict[str, dict]:
    """Per wanted key whose every planned subnet is in `records` (tag -> profiled record with `block_ms`):
    a record like an isolated block's, its latency the median over its contexts (`in_context` marks it:
    no call overhead to subtract, node times do not include it)."""
    places = plan.contexts()
    done: dict[str, dict] = {}
    for key in wanted:
        where = places.get(key, [])
        if not where or any(tag not in records for tag, _ in where):
            continue
        times = [records[tag]["block_ms"].get(position, 0.0) for tag, position in where]
        last = max((records[tag] for tag, _ in where), key=lambda r: r["measured_at"])
        q1, median, q3 = np.percentile(times, [25, 50, 75])
        references = [records[tag]["reference_ms"] for tag, _ in where if records[tag].get("reference_ms")]
        # energy: each context's time share of its subnet's energy (raynas.hw.remote._per_block), median
        energies = [records[tag]["block_mj"].get(position, 0.0) for tag, position in where
                    if records[tag].get("block_mj") is not None]
        done[key] = {
            "tag": key, "median_ms": float(median), "iqr_ms": float(q3 - q1), "runs": len(times), "series": 1,
            "clock": "profile", "wall_median_ms": float(median), "passes": last.get("passes", 1),
            "pass_spread": float((max(times) - min(times)) / median) if median else 0.0,
            "reference_ms": float(np.median(references)) if references else None,
            "node_id": last["node_id"], "hostname": last["hostname"], "measured_at": last["measured_at"],
            "in_context": True, "energy_mj": float(np.median(energies)) if len(energies) == len(where) else None,
            "idle_w": last.get("idle_w"),
        }
    return done


_SCOPE = re.compile(r"^/\d+/")  # the block scope the exporter gives every node of an nn.Sequential subnet


def _scope_of(name: str) -> str | None:
    match = _SCOPE.match(name)
    return match.group(0) if match else None


def scope_nodes(model_bytes: bytes) -> bytes:
    """The model with every node that lacks a block scope named into the scope of the first scoped node
    its outputs feed (a weight's DequantizeLinear: its Conv's block), else of the scoped node whose output
    it reads (the final DequantizeLinear: the last block's). Nodes already scoped keep their names."""
    model = onnx.load_from_string(model_bytes)
    nodes = list(model.graph.node)
    consumers: dict[str, list[int]] = defaultdict(list)
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for tensor in node.input:
            consumers[tensor].append(i)
        for tensor in node.output:
            producer[tensor] = i
    scope = [_scope_of(n.name) for n in nodes]
    for i in reversed(range(len(nodes))):  # consumers come after their producers (topological order)
        if scope[i] is None:
            scope[i] = next((scope[c] for t in nodes[i].output for c in consumers[t] if scope[c]), None)
    for i, node in enumerate(nodes):
        if scope[i] is None:
            scope[i] = next((scope[producer[t]] for t in node.input if t in producer and scope[producer[t]]), None)
    for i, node in enumerate(nodes):
        if scope[i] and not _scope_of(node.name):
            node.name = f"{scope[i]}{node.name or f'{node.op_type}_{i}'}"
    return model.SerializeToString()
