"""Per-device latency lookup tables over every distinct block configuration of a space (seed 004 §3).

A block configuration is identified by `Block.key` (the piece's choices at its stage position, incl. its
input shape), so a table row is one distinct computation; a subnet's raw LUT latency is the sum of its
blocks' rows. Configurations are collected from `blocks()` of the smallest, the largest and random
subnets until `patience` samples in a row bring no new key; a family that lists its blocks itself
(`Supernet.block_variants(resolution) -> list[Block]`) is only verified by a few sampled subnets.

Each row keeps the block's time as measured (`latency_raw_ms`) and the device's reference time measured
with it (`reference_ms`, raynas.hw.measure.ReferenceClock); `latency_ms`, what the models sum, is the raw
time stated at the group's reference speed, so rows measured at different moments stay comparable.
Blocks are timed each in its own session (method "isolated") or inside whole profiled subnets ("context",
raynas.hw.in_context), at the numeric precision the board runs (raynas.hw.precision): the device converts
every exported FP32 block to that precision before timing it.

On a device with an energy meter (raynas.hw.energy) each row also holds `energy_mj`, the block's energy per
inference above idle, measured over the same calls as its latency, less the call's fixed cost as latency is;
NaN on a device without one. A block timed in context is charged its time share of its subnet's energy
(raynas.hw.remote._per_block): a meter sees the subnet, never one node.

Tables are Parquet, one row per (space, device, runtime, resolution, num_classes, precision, key); a file
may hold several groups (e.g. a device's fp32 and int8 tables side by side). Files written before
precisions existed have no `precision` column: their groups are read as fp32. A LUT lives at a location
raynas.storage reads and writes (a local path or a URI such as s3://bucket/luts/x.parquet). Building again
into the same location measures only the keys it lacks, and a build persists its blocks as it goes, so a
killed one resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
import torch
from tqdm import tqdm

from raynas import storage
from raynas.errors import UserError
from raynas.hw.devices import LUT_METHODS, DeviceSpec
from raynas.hw.features import FEATURES, block_features
from raynas.hw.in_context import plan_subnets, rows_in_context
from raynas.hw.measure import at_reference_speed, identity_onnx
from raynas.hw.onnx_export import ExportMismatch, export_onnx
from raynas.hw.remote import Profiler
from raynas.space import Arch
from raynas.supernets.base import Block, Subnet, Supernet

META_KEY = b"raynas.lut"
GROUP_COLUMNS = ("space", "device", "runtime", "resolution", "num_classes", "precision")
LEGACY_PRECISION = "fp32"  # what LUTs and calibrations written before precisions existed measured


@dataclass(frozen=True)
class TableKey:
    """Which device measured which space at which input size and precision: the identity of a LUT group."""

    space: str
    device: str
    runtime: str
    resolution: int
    num_classes: int
    precision: str = "fp32"

    @property
    def id(self) -> str:
        return "|".join(str(v) for v in asdict(self).values())

    @property
    def legacy_id(self) -> str | None:
        """The id this group had in files written before precisions existed (only fp32 was measured then)."""
        return _without_precision(self.id) if self.precision == LEGACY_PRECISION else None

    @classmethod
    def of(cls, supernet: Supernet, device: DeviceSpec, precision: str = "fp32") -> TableKey:
        s = supernet.space
        return cls(s.name, device.name, device.runtime, int(s.resolution), int(s.num_classes), precision)


def _without_precision(group_id: str) -> str:
    return group_id.rsplit("|", 1)[0]


def upgrade_group_id(group_id: str) -> str:
    """A group id as written before precisions existed (one field short) is that group's fp32 id."""
    return f"{group_id}|{LEGACY_PRECISION}" if group_id.count("|") == len(GROUP_COLUMNS) - 2 else group_id


def progress(iterable=None, **kwargs) -> tqdm:
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 1.0)
    return tqdm(iterable, **kwargs)


# ---- which blocks exist -----------------------------------------------------------------------------
@dataclass
class BlockCatalogue:
    """The distinct block configurations found, each with one module and its first position."""

    blocks: dict[str, Block]
    positions: dict[str, int]
    archs_scanned: int
    from_hook: int = 0
    scanned: list[tuple[Arch, list[str]]] = field(default_factory=list)  # each sampled arch, its blocks' keys


def family_block_variants(supernet: Supernet) -> list[Block]:
    """The blocks the family lists itself (`Supernet.block_variants`); [] when it leaves them to sampling."""
    return list(supernet.block_variants(supernet.space.resolution))


def collect_block_configs(supernet: Supernet, *, seed: int = 0, max_archs: int = 3000, patience: int = 300,
                          verify: int = 20, show_progress: bool = True) -> BlockCatalogue:
    """Distinct `Block.key`s of the space at the supernet's resolution (see the module doc).

    With a family enumerator, `verify` sampled subnets (plus the smallest and largest) check that it
    covers what `blocks()` produces; sampling continues with `patience` only if they find new keys.
    """
    space = supernet.space
    rng = np.random.default_rng(seed)
    blocks: dict[str, Block] = {}
    positions: dict[str, int] = {}

    def add(found: Iterable[Block]) -> int:
        new = 0
        for i, b in enumerate(found):
            if b.key not in blocks:
                blocks[b.key] = b
                positions[b.key] = i
                new += 1
        return new

    from_hook = add(family_block_variants(supernet))
    enough = verify if from_hook else patience
    scanned, since_new = 0, 0
    bar = progress(desc=f"block configs of {space.name}", unit="arch", disable=not show_progress)
    archs: Iterator = iter([space.min_arch(), space.max_arch()])
    seen: list[tuple[Arch, list[str]]] = []
    while scanned < max_archs and since_new < enough:
        arch = next(archs, None)
        arch = space.sample(rng) if arch is None else arch
        found = supernet.blocks(arch)
        seen.append((arch, [b.key for b in found]))
        new = add(found)
        scanned += 1
        since_new = 0 if new else since_new + 1
        if new:
            enough = patience  # the enumerator missed something: fall back to sampling to saturation
        bar.update(1)
        bar.set_postfix(keys=len(blocks), refresh=False)
    bar.close()
    return BlockCatalogue(blocks, positions, scanned, from_hook, seen)


# ---- export -------------------------------------------------------------------------------------------
def onnx_bytes(module, input_shape: tuple[int, ...]) -> bytes:
    """The module as verified ONNX (raynas.hw.onnx_export), as bytes to ship to a device node.

    Profiling uses untrained weights, whose activations can reach hundreds: there float32 rounding alone
    exceeds the exporter's absolute 1e-4, so a failed check is retried with 1e-4 relative to the output's
    magnitude (a wrong graph still fails by far more).
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        try:
            export_onnx(module, tuple(input_shape), path)
        except ExportMismatch:
            with torch.no_grad():
                scale = float(module.eval()(torch.randn(input_shape)).abs().max())
            export_onnx(module, tuple(input_shape), path, atol=1e-4 * max(1.0, scale))
        return path.read_bytes()


def subnet_onnx(supernet: Supernet, arch: Arch) -> tuple[bytes, tuple[int, ...]]:
    """The extracted subnet as verified ONNX and its input shape (that of its first block: a family may
    take inputs at another resolution than the space's, e.g. an input-resize piece)."""
    blocks = supernet.blocks(arch)
    subnet = Subnet(blocks, arch, supernet.space.name).eval()
    shape = tuple(blocks[0].in_shape)
    return onnx_bytes(subnet, shape), shape


# ---- measuring on several devices at once -------------------------------------------------------------
def measure_on_devices(profilers: list[Profiler], items: list[tuple[str, Callable[[], tuple[bytes, tuple]]]],
                       chunk: int = 8, desc: str = "measuring", show_progress: bool = True, passes: int = 1,
                       seed: int = 0, on_done: Callable[[dict[str, dict[str, dict]]], None] | None = None,
                       per_block: bool = False, precision: str = "fp32") -> dict[str, list[dict]]:
    """Measure every `(tag, make)` on every profiler, `make() -> (onnx_bytes, input_shape)` exporting
    the FP32 model; returns the records per device name, in `items` order. Each device converts the models
    to `precision` itself before timing them (raynas.hw.remote), so the driver exports each model once.

    Export (on the driver) and measurement alternate chunk by chunk: the next chunk is exported while the
    devices measure the current one, unless a device is this node and times on the wall clock (export
    would steal the CPU that measurement is timing). On the thread clock the time export takes from the
    timed thread is not counted (it runs on another core or between the thread's slices), so a local
    device overlaps too, which keeps both cores of a small host busy.

    `passes` > 1 measures everything again, each pass in a new random order, and keeps per model the pass
    with the median latency (the lower one of an even count): a host whose speed drifts (other jobs,
    thermal) then spreads its drift over all models instead of biasing the ones measured in a slow moment.
    `pass_spread` records (max - min) / median of the passes.

    `on_done(done)`, when given, is called each time models are complete (every pass measured) with all
    complete ones so far, `{device: {tag: record}}`, e.g. to persist them before the rest is measured.
    `per_block`: the models are subnets, profiled per block (see `DeviceProfiler.measure`).
    """
    driver_node = ray.get_runtime_context().get_node_id()
    overlap = all(p.node["node_id"] != driver_node or p.device.protocol.clock == "thread" for p in profilers)
    per_pass: dict[str, dict[str, list[dict]]] = {p.device.name: {} for p in profilers}
    done: dict[str, dict[str, dict]] = {p.device.name: {} for p in profilers}
    bar = progress(total=len(items) * len(profilers) * passes, desc=desc, unit="model", disable=not show_progress)
    pending: list = []

    def collect(calls) -> None:
        completed = False
        for p, call in calls:
            # A profiler that died meanwhile is replaced and measures this chunk again; earlier chunks'
            # records are in `done` (and persisted by `on_done`), so nothing measured before is lost.
            records = p.collect(call)
            name = p.device.name
            for r in records:
                runs = per_pass[name].setdefault(r["tag"], [])
                runs.append(r)
                if len(runs) == passes:
                    done[name][r["tag"]] = _median_pass(runs)
                    completed = True
            bar.update(len(records))
        if completed and on_done is not None:
            on_done(done)

    for batch in _export_batches(items, chunk, passes, seed):  # each batch is exported here, on the driver
        if not overlap:
            collect(pending)
            pending = []
        calls = [(p, p.submit(batch, per_block, precision)) for p in profilers]
        if overlap:
            collect(pending)
            pending = calls
        else:
            collect(calls)
    collect(pending)
    bar.close()
    return {name: [by_tag[tag] for tag, _ in items] for name, by_tag in done.items()}


def _export_batches(items: list[tuple[str, Callable[[], tuple[bytes, tuple]]]], chunk: int, passes: int,
                    seed: int) -> Iterator[list[tuple[str, ray.ObjectRef, tuple]]]:
    """Chunks of `(tag, model in the object store, input shape)` for every pass, each pass after the first
    in a new random order. A model is exported when its chunk is first asked for, and only once."""
    exported: dict[str, tuple] = {}
    rng = np.random.default_rng(seed)
    for n in range(passes):
        order = list(range(len(items))) if n == 0 else list(rng.permutation(len(items)))
        for start in range(0, len(order), chunk):
            batch = []
            for i in order[start:start + chunk]:
                tag, make = items[i]
                entry = exported.get(tag)
                if entry is None:
                    model, shape = make()
                    entry = (ray.put(model), tuple(shape))
                    if passes > 1:  # kept for the next passes; with one pass the store frees it once measured
                        exported[tag] = entry
                batch.append((tag, *entry))
            yield batch


def _median_pass(runs: list[dict]) -> dict:
    runs = sorted(runs, key=lambda r: r["median_ms"])
    chosen = dict(runs[(len(runs) - 1) // 2])
    medians = [r["median_ms"] for r in runs]
    chosen["passes"] = len(runs)
    chosen["pass_spread"] = (medians[-1] - medians[0]) / chosen["median_ms"] if chosen["median_ms"] else 0.0
    return chosen


# ---- the table ------------------------------------------------------------------------------------------
def build_lut(supernet: Supernet, profilers: list[Profiler], existing: pd.DataFrame | None = None,
              existing_meta: dict[str, dict] | None = None, seed: int = 0, max_archs: int = 3000,
              patience: int = 300, passes: int = 1, show_progress: bool = True, out: str | None = None,
              method: str = "isolated", appearances: int = 2, precision: str = "fp32"
              ) -> tuple[pd.DataFrame, dict[str, dict]]:
    """Measure every distinct block of `supernet`'s space on each device, in parallel across devices.

    `precision`: each device converts every block to it before timing (raynas.hw.precision.convert, seeded
    calibration inputs); its rows form the group (space, device, ..., precision). A device that does not
    run the precision is refused before anything is measured.

    `method`: "isolated" times each block in its own session; "context" profiles a few whole subnets that
    contain every block `appearances` times and credits each node's time to its block
    (raynas.hw.in_context); the blocks no sampled subnet contains are then timed isolated.

    Keys already in `existing` (a table from `read_lut`, with its `existing_meta`) for a device's group are
    reused, not measured again. Returns the rows of all groups touched (existing + new) and per-group
    metadata; `build_s` is the total time spent on the group over every build that contributed rows.
    `passes`: see `measure_on_devices` (more passes, steadier entries on a host whose speed drifts).

    `out`: a LUT location (path or URI). The blocks measured so far are merged into it as the build goes
    (each write atomic, through raynas.storage), and the result at the end, so a killed build keeps what it
    measured and the next build reading `out` measures only the rest. Without `out` nothing is written
    (the caller stores the result with `write_lut`).
    """
    if method not in LUT_METHODS:
        raise ValueError(f"method: {method!r}; allowed: {list(LUT_METHODS)}")
    for p in profilers:
        p.device.check_precision(precision, "precision")
    t0 = time.perf_counter()
    catalogue = collect_block_configs(supernet, seed=seed, max_archs=max_archs, patience=patience,
                                      show_progress=show_progress)
    existing = existing if existing is not None else empty_table()
    keys = {p.device.name: TableKey.of(supernet, p.device, precision) for p in profilers}
    # Rows measured otherwise (protocol, clock, threads, batch, method) are not comparable: measure anew.
    old = {p.device.name: select(existing, keys[p.device.name])
           if _same_settings((existing_meta or {}).get(keys[p.device.name].id), p.device, method) else empty_table()
           for p in profilers}
    wanted = [k for k in catalogue.blocks if any(k not in set(rows["key"]) for rows in old.values())]
    features = {k: block_features(catalogue.blocks[k].module, catalogue.blocks[k].in_shape)
                for k in progress(wanted, desc="block features", unit="block", disable=not show_progress)}
    plan = plan_subnets(supernet, wanted, seed, appearances, known=catalogue.scanned) \
        if method == "context" and wanted else None
    isolated = wanted if plan is None else plan.uncovered
    build = _Build(profilers, keys, old, wanted, catalogue, features, existing_meta or {}, passes, t0, method,
                   len(plan.archs) if plan else 0)
    done: dict[str, dict[str, dict]] = {p.device.name: {} for p in profilers}

    def persist(records: dict[str, dict[str, dict]], in_context: bool = False) -> None:
        for name, by_tag in records.items():
            done[name].update(rows_in_context(plan, by_tag, wanted) if in_context else by_tag)
        if out is not None:
            write_lut(out, *build.assemble(done))

    common = dict(passes=passes, seed=seed, show_progress=show_progress, precision=precision)
    name = f"LUT {supernet.space.name}" + ("" if precision == "fp32" else f" {precision}")
    phases = [(name, _isolated_items(catalogue, isolated), False)] if isolated else []
    if plan is not None and plan.archs:
        subnets = [(a.to_json(), (lambda a=a: subnet_onnx(supernet, a))) for a in plan.archs]
        phases.insert(0, (f"{name} in context", subnets, True))
    for desc, items, in_context in phases:
        measured = measure_on_devices(profilers, items, chunk=2 if in_context else 8, desc=desc,
                                      per_block=in_context, on_done=lambda d, c=in_context: persist(d, c), **common)
        persist({name: {r["tag"]: r for r in records} for name, records in measured.items()}, in_context)
    rows, meta = build.assemble(done)
    if out is not None:
        write_lut(out, rows, meta)
    return rows, meta


def _isolated_items(catalogue: BlockCatalogue, keys: list[str]) -> list[tuple[str, Callable[[], tuple]]]:
    """The models that time `keys` each in its own session: first onnxruntime's fixed cost per call for
    each input shape (see measure.identity_onnx; measured first because a block's row needs it, so blocks
    are complete, and persisted, from the first chunk on), then the blocks."""
    def maker(block: Block):
        return lambda: (onnx_bytes(block.module, block.in_shape), block.in_shape)

    shapes = sorted({tuple(catalogue.blocks[k].in_shape) for k in keys})
    items = [(f"identity:{list(s)}", (lambda s=s: (identity_onnx(s), s))) for s in shapes]
    return items + [(k, maker(catalogue.blocks[k])) for k in keys]


@dataclass
class _Build:
    """One `build_lut` call: the groups it extends (`old` rows per device) and the blocks it measures."""

    profilers: list[Profiler]
    keys: dict[str, TableKey]
    old: dict[str, pd.DataFrame]
    wanted: list[str]
    catalogue: Any
    features: dict[str, dict[str, float]]
    existing_meta: dict[str, dict]
    passes: int
    started: float
    method: str = "isolated"
    subnets: int = 0  # profiled in context

    def assemble(self, done: dict[str, dict[str, dict]]) -> tuple[pd.DataFrame, dict[str, dict]]:
        """The table and metadata of every group from the rows reused and the blocks complete in `done`."""
        build_s = time.perf_counter() - self.started
        frames, meta = [], {}
        for p in self.profilers:
            key, old = self.keys[p.device.name], self.old[p.device.name]
            new = pd.DataFrame(self._rows(key, set(old["key"]), done.get(p.device.name, {})), columns=TABLE_COLUMNS)
            group = pd.concat([old, new], ignore_index=True) if len(new) else old
            group, baseline = _at_reference_speed(group)
            frames.append(group)
            reused = len(group) - len(new)
            previous_s = self.existing_meta.get(key.id, {}).get("build_s", 0.0) if reused else 0.0
            meta[key.id] = {
                **asdict(key), "build_s": round(previous_s + (build_s if len(new) else 0.0), 3),
                "blocks": int(len(group)), "measured": len(new),
                "reused": int(reused), "archs_scanned": self.catalogue.archs_scanned,
                "threads": p.device.threads, "batch_size": p.device.batch_size, "passes": self.passes,
                "protocol": asdict(p.device.protocol), "onnxruntime": p.node.get("onnxruntime"),
                "hostname": p.node.get("hostname"), "reference_ms": baseline, "method": self.method,
                "subnets": self.subnets, "energy_meter": energy_meter_name(p.device),
            }
        return pd.concat(frames, ignore_index=True), meta

    def _rows(self, key: TableKey, have: set[str], records: dict[str, dict]) -> list[dict[str, Any]]:
        """Rows of the wanted blocks complete in `records`, less their input shape's call overhead when
        timed isolated (a block timed in context has none: node times exclude the call).

        Energy mirrors latency: a block's `energy_mj` is its energy per call less the identity model's (the
        call's fixed cost, paid once per subnet, not once per block), NaN where the device has no meter.
        Unlike latency it is not clamped at 0: a block cheaper than the meter resolves reads a little
        negative or positive at random, and a subnet's sum of them stays unbiased."""
        overhead = {tuple(json.loads(t.split(":", 1)[1])): r for t, r in records.items() if t.startswith("identity:")}
        rows = []
        for k in self.wanted:
            b = self.catalogue.blocks[k]
            if k in have or k not in records:
                continue
            r = records[k]
            identity = {"median_ms": 0.0, "energy_mj": 0.0} if r.get("in_context") else overhead.get(tuple(b.in_shape))
            if identity is None:
                continue
            oh, oh_mj = identity["median_ms"], _energy(identity.get("energy_mj"))
            rows.append({
                **asdict(key), "key": k, "position": self.catalogue.positions[k],
                "in_shape": json.dumps(list(b.in_shape)),
                # latency_ms: stated at the group's reference speed by `_at_reference_speed`
                "latency_ms": max(r["median_ms"] - oh, 0.0), "latency_raw_ms": max(r["median_ms"] - oh, 0.0),
                "reference_ms": r.get("reference_ms"), "median_ms": r["median_ms"], "overhead_ms": oh,
                "iqr_ms": r["iqr_ms"], "runs": r["runs"], "series": r["series"], "clock": r["clock"],
                "wall_median_ms": r["wall_median_ms"], "passes": r["passes"], "pass_spread": r["pass_spread"],
                "energy_mj": _energy(r.get("energy_mj")) - oh_mj, "overhead_mj": oh_mj,
                "idle_w": _energy(r.get("idle_w")),
                **{f"f_{name}": self.features[k][name] for name in FEATURES},
                "node_id": r["node_id"], "hostname": r["hostname"], "measured_at": r["measured_at"],
            })
        return rows


def _energy(value: float | None) -> float:
    """A measured energy figure, NaN when nothing was measured (a device without a meter)."""
    return np.nan if value is None else float(value)


def _at_reference_speed(group: pd.DataFrame) -> tuple[pd.DataFrame, float | None]:
    """The group with `latency_ms` = `latency_raw_ms` stated at the group's reference speed
    (`lut_baseline_ms`, returned too). Recomputed from the raw values whenever the group changes, so rows
    measured in different builds stay comparable. The call overhead subtracted from a block was measured
    at nearly the same moment (the first items of the build), so it is not restated apart. Energy is kept as
    measured: a host slowed by a neighbour takes longer per call without the inference costing more joules."""
    baseline = lut_baseline_ms(group)
    if baseline is None:
        return group, None
    group = group.copy()
    group["latency_ms"] = [at_reference_speed(float(raw), ref, baseline)
                           for raw, ref in zip(group["latency_raw_ms"], pd.to_numeric(group["reference_ms"]))]
    return group, baseline


def lut_baseline_ms(group: pd.DataFrame) -> float | None:
    """The reference speed (ms per call of the reference model) that a LUT group's `latency_ms` is stated at:
    the median `reference_ms` of its rows. None for a group measured without a reference."""
    reference = pd.to_numeric(group["reference_ms"], errors="coerce") if len(group) else pd.Series(dtype=float)
    return None if reference.isna().all() else float(reference.median())


def _same_settings(meta: dict | None, device: DeviceSpec, method: str) -> bool:
    # A group measured without a meter lacks the energy the device now declares: measured anew, with it.
    return bool(meta) and meta.get("protocol") == asdict(device.protocol) and \
        meta.get("threads") == device.threads and meta.get("batch_size") == device.batch_size and \
        meta.get("method", "isolated") == method and meta.get("energy_meter") == energy_meter_name(device)


def energy_meter_name(device: DeviceSpec) -> str | None:
    return device.energy.meter if device.energy is not None else None


TABLE_COLUMNS = [*GROUP_COLUMNS, "key", "position", "in_shape", "latency_ms", "latency_raw_ms", "reference_ms",
                 "median_ms", "overhead_ms",
                 "iqr_ms", "runs", "series", "clock", "wall_median_ms", "passes", "pass_spread",
                 "energy_mj", "overhead_mj", "idle_w",
                 *(f"f_{n}" for n in FEATURES),
                 "node_id", "hostname", "measured_at"]


# Columns added after LUTs were first written, and how a table without them is read: such a group was measured
# without a reference, so its latencies are raw (and its protocol differs: a new build measures it anew); and
# it was measured at fp32, the only precision there was; and without an energy meter.
LATER_COLUMNS = {"latency_raw_ms": lambda t: t["latency_ms"], "reference_ms": lambda t: np.nan,
                 "precision": lambda t: LEGACY_PRECISION, "energy_mj": lambda t: np.nan,
                 "overhead_mj": lambda t: np.nan, "idle_w": lambda t: np.nan}


def empty_table() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object") for c in TABLE_COLUMNS})


def select(table: pd.DataFrame, key: TableKey) -> pd.DataFrame:
    mask = np.ones(len(table), dtype=bool)
    for col, value in asdict(key).items():
        mask &= (table[col] == value).to_numpy()
    return table[mask].reset_index(drop=True)


def read_lut(location: str | os.PathLike, what: str = "--lut") -> tuple[pd.DataFrame, dict[str, dict]]:
    """All groups of a LUT (a path or URI) and their metadata ({} for a LUT that does not exist yet).

    A file that is not a LUT (unreadable, another Parquet, columns missing) is one `UserError` line
    naming `what` (the option that gave the location) and the file.
    """
    if not storage.exists(location):
        return empty_table(), {}
    table = storage.read_table(location, what)
    meta = _lut_meta(table, location, what)
    frame = table.to_pandas()
    for column, fill in LATER_COLUMNS.items():
        if column not in frame:
            frame[column] = fill(frame)
    return frame[TABLE_COLUMNS], meta


def _lut_meta(table: pa.Table, location: str | os.PathLike, what: str) -> dict[str, dict]:
    def refuse(reason: str) -> UserError:
        return UserError(f"{what}: {storage.display(location)} is not a raynas LUT ({reason}); allowed: a "
                         "Parquet file written by `raynas profile lut` (or a location not holding a file yet)")

    missing = [c for c in TABLE_COLUMNS if c not in table.column_names and c not in LATER_COLUMNS]
    if missing:
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise refuse(f"missing columns {missing[:4]}{more}")
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise refuse(f"no '{META_KEY.decode()}' metadata")
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or not all(isinstance(m, dict) for m in meta.values()):
        raise refuse(f"its '{META_KEY.decode()}' metadata is not a JSON object of groups")
    # Groups stored before precisions existed: their metadata is that of the fp32 group they are read as.
    return {upgrade_group_id(gid): m if upgrade_group_id(gid) == gid else {**m, "precision": LEGACY_PRECISION}
            for gid, m in meta.items()}


def write_lut(location: str | os.PathLike, rows: pd.DataFrame, meta: dict[str, dict], what: str = "--lut") -> None:
    """Merge `rows` (whole groups) into the LUT at `location` (path or URI), replacing those groups; other
    groups stay. The write is atomic (raynas.storage): a reader sees the old table or the new one."""
    table, old_meta = read_lut(location, what)
    replaced = set(rows[list(GROUP_COLUMNS)].astype(str).agg("|".join, axis=1)) if len(rows) else set()
    replaced |= set(meta)
    if len(table):
        ids = table[list(GROUP_COLUMNS)].astype(str).agg("|".join, axis=1)
        table = table[~ids.isin(replaced)]
    merged = pd.concat([t for t in (table, rows) if len(t)], ignore_index=True) if len(table) or len(rows) \
        else empty_table()
    old_meta.update(meta)
    arrow = pa.Table.from_pandas(merged[TABLE_COLUMNS], preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), META_KEY: json.dumps(old_meta).encode()})
    storage.write_table(location, arrow)


def load_group(location: str | os.PathLike, key: TableKey, what: str = "--lut") -> tuple[pd.DataFrame, dict]:
    """One group of a LUT; raises a UserError naming what the file holds when it is absent."""
    table, meta = read_lut(location, what)
    rows = select(table, key)
    if not len(rows):
        held = sorted(meta) or ["nothing"]
        build = "" if key.precision == "fp32" else f" --precision {key.precision}"
        raise UserError(f"{what} {storage.display(location)}: no table for {key.id} ({'|'.join(GROUP_COLUMNS)}); "
                        f"the file holds {held}; build it with `raynas profile lut{build}`")
    return rows, meta.get(key.id, {})
