"""`raynas search`: from a trained supernet and a latency model to exported Pareto-optimal subnets.

run_dir (a local path or a URI such as s3://bucket/prefix; every file goes through raynas.storage)/
  config.yaml              the validated config
  evaluations/part-*.parquet  one file per finished evaluation (append-only; `--resume` reads them)
  evaluations.parquet      all evaluations, compacted at the end
  front.parquet            the Pareto front (feasible evaluations only)
  onnx/subnet_<i>.onnx     the exported subnets, verified against PyTorch (only them: a folder to deploy)
  exports/subnet_<i>.json  each one's export record (arch, ONNX digest, measurement): a re-run reuses it
  exported.parquet         exported subnets: predicted vs measured latency on the target device
  references/              the space's reference models (onnx/, exports/), exported and measured like the front
  report.md, pareto.png    the report (report.parquet: its points, with the full arch JSON)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import yaml

from raynas import storage
from raynas.errors import ConfigError
from raynas.search.algorithms import Constraints, SearchContext, build_algorithm
from raynas.search.config import LIVE, uses_energy
from raynas.search.deployed import DeployConfig
from raynas.search.driver import estimate_fn, run_search
from raynas.search.evaluator import EvaluatorConfig, make_evaluator_pool, pool_evaluator
from raynas.search.live import LiveCorrection, LiveLatency
from raynas.search.pareto import pareto_front
from raynas.search.results import ResultStore, part_files
from raynas.space import Arch

# Exports subnets as deployed: arch JSONs -> (arch JSON, (ONNX bytes, record fields)) as each finishes.
DeployedFn = Callable[[list[str]], Iterator[tuple[str, tuple[bytes, dict]]]]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare_run_dir(cfg: dict[str, Any], resume: bool) -> str:
    """A fresh run refuses to overwrite earlier results; `resume` continues them. Returns the run_dir."""
    run_dir = storage.normalize(cfg["run_dir"])
    if not resume and part_files(storage.join(run_dir, "evaluations")):
        raise ConfigError(f"run_dir: {storage.display(run_dir)} already holds evaluations; pass --resume to "
                          "continue that search or choose another run_dir")
    storage.check_writable(run_dir, "run_dir")
    storage.write_text(storage.join(run_dir, "config.yaml"), yaml.safe_dump(cfg, sort_keys=False))
    return run_dir


@dataclass
class SearchOutcome:
    algorithm: Any              # the SearchAlgorithm that ran
    records: list[dict]         # every evaluation, one per arch
    front: list[dict]           # the Pareto front of the feasible ones
    reused: int                 # evaluations already stored when the run started (a resumed search)
    actors_replaced: int        # evaluator actors that died and were replaced
    profilers_replaced: int = 0  # live latency: profiler actors that died and were replaced
    live: tuple[list[dict], list[dict]] | None = None  # live correction: (measured candidates, calibrations)


def search_front(run_dir: str, ctx: SearchContext, search: dict[str, Any], device: str, resume: bool,
                 start_pool: Callable[[], Any], evaluator_of: Callable[[Any], Any],
                 live_latency: Callable[[], LiveLatency] | None = None,
                 correction: Callable[[LiveLatency], LiveCorrection] | None = None) -> SearchOutcome:
    """Run the configured algorithm (`search` section) with a pool of evaluator actors; every evaluation is
    stored under run_dir/evaluations (a resume answers stored archs from there), then compacted, and the
    feasible Pareto front written to front.parquet. Shared by `raynas search` and the big/little pair search,
    which differ in their space, their evaluator actors (`start_pool`) and what is added to their results
    (`evaluator_of(pool)`, a `run_search` evaluator). `live_latency()`: the profilers that measure every
    candidate on the device (`latency.model: live`), or, with `correction(live)`, that correct the latency
    model generation by generation and measure the final front (`latency.correction`)."""
    from raynas.hw.devices import init_local_ray

    algorithm = build_algorithm(search["algorithm"], ctx, search["budget"], **(search["params"] or {}))
    store = ResultStore(storage.join(run_dir, "evaluations"))
    reused = len(store)
    if resume and reused:
        log(f"[search] resuming: {reused} evaluations already stored in {storage.display(run_dir)}")
    init_local_ray(devices=[device])
    pool = start_pool()
    live = live_latency() if live_latency is not None else None
    corrector = correction(live) if correction is not None and live is not None else None
    try:
        asked = run_search(algorithm, evaluator_of(pool), store, progress=log,
                           live=live if corrector is None else None,
                           after_generation=corrector.after_generation if corrector else None)
        records = list({r["arch"]: r for r in asked}.values())
        if corrector is not None:
            records = corrector.finalize(records)
            _log_correction(corrector, run_dir)
    finally:
        pool.shutdown()
        if live is not None:
            live.shutdown()
    store.compact(storage.join(run_dir, "evaluations.parquet"), records)
    front = pareto_front([r for r in records if r["feasible"]], ctx.objectives)
    storage.write_pandas(storage.join(run_dir, "front.parquet"), pd.DataFrame(front))
    return SearchOutcome(algorithm, records, front, reused, pool.replaced, live.replaced if live else 0,
                         (corrector.store.records(), corrector.history) if corrector else None)


def _log_correction(corrector: LiveCorrection, run_dir: str) -> None:
    """The calibration after each generation, and every live-measured candidate, beside the run."""
    storage.write_pandas(storage.join(run_dir, "live_calibration.parquet"), pd.DataFrame(corrector.history))
    measured = corrector.store.to_pandas()
    storage.write_pandas(storage.join(run_dir, "live_measured.parquet"), measured)
    first, last = corrector.history[0], corrector.history[-1]
    log(f"[search] live correction: {len(measured)} candidates measured; kappa {first['slope']:.4g} -> "
        f"{last['slope']:.4g}, epsilon {first['intercept']:.4g} -> {last['intercept']:.4g}")


def _corrects(lat: dict[str, Any]) -> bool:
    """Whether the latency model is corrected live (`latency.correction`): `auto` does it when the device
    is a node of its own (a board, not the driver's machine), whose profiler measures without stealing the
    CPU of the search."""
    import ray

    from raynas.hw.devices import init_local_ray, labelled_nodes

    if lat["correction"] != "auto":
        return lat["correction"] == "on"
    init_local_ray(devices=[lat["device"]])
    here = ray.get_runtime_context().get_node_id()
    return any(node != here for node in labelled_nodes(lat["device"]))


def _calibration_of(supernet, lat: dict[str, Any], precision: str) -> dict[str, Any]:
    from raynas.hw.devices import get_device
    from raynas.hw.latency import calibration_path, load_calibration
    from raynas.hw.lut import TableKey

    key = TableKey.of(supernet, get_device(lat["device"], lat["devices_file"]), precision)
    return load_calibration(calibration_path(lat["lut"]), key)


def _live_latency(supernet, lat: dict[str, Any], precision: str) -> LiveLatency:
    from raynas.hw.devices import get_device
    from raynas.hw.remote import start_profilers

    profilers = start_profilers(get_device(lat["device"], lat["devices_file"]))
    log(f"[search] live latency: {len(profilers)} profiler(s) on {lat['device']} "
        f"({', '.join(p.node['hostname'] for p in profilers)})")
    return LiveLatency(supernet, profilers, precision)


def spread_along_front(front: list[dict], k: int) -> list[dict]:
    """k front members evenly spaced by rank along the front (ends always included)."""
    if k <= 0 or not front:
        return []
    if len(front) <= k:
        return list(front)
    idx = sorted({round(i * (len(front) - 1) / (k - 1)) for i in range(k)}) if k > 1 else [len(front) - 1]
    return [front[i] for i in idx]


def export_and_measure(chosen: list[dict], run_dir: str, input_shape: tuple[int, ...], deployed: DeployedFn,
                       device: str | None, devices_file: str | None, precision: str = "fp32") -> list[dict]:
    """Write each chosen subnet as deployed (`deployed(arch_jsons)`: BN recalibrated, verified ONNX at the
    deploy precision, from the evaluator actors) to run_dir/onnx; measure it on the target device's node.

    Each record's `onnx` is relative to run_dir, so the run reads the same wherever it is copied. Each
    subnet's export (and then its measurement) is recorded in `exports/subnet_<i>.json`, with the ONNX
    bytes' digest: a re-run (a killed pipeline's) reuses what that record vouches for and redoes
    the rest, including an ONNX file that does not match its record (torn, or from an older run, or at
    another precision).
    """
    records: list[dict | None] = []  # per subnet: what its `exports/subnet_<i>.json` holds
    for i, rec in enumerate(chosen):
        done = _stored_export(storage.join(run_dir, "onnx", f"subnet_{i}.onnx"), _record_of(run_dir, i), rec["arch"])
        records.append(done if done is not None and done.get("precision", "fp32") == precision else None)
    missing = {chosen[i]["arch"]: i for i, done in enumerate(records) if done is None}
    for arch, (model, info) in (deployed(list(missing)) if missing else ()):
        i = missing[arch]
        storage.write_bytes(storage.join(run_dir, "onnx", f"subnet_{i}.onnx"), model)
        records[i] = {"arch": arch, "onnx": f"onnx/subnet_{i}.onnx", **info, "onnx_sha256": _digest(model)}
        storage.write_json(_record_of(run_dir, i), records[i])
    todo = [i for i, done in enumerate(records) if device and done.get("device") != device]
    log(f"[search] export: {len(records)} subnets, {len(records) - len(missing)} already exported, "
        f"{len(todo)} to measure (at {precision})")
    if todo:
        from raynas.hw.devices import get_device
        from raynas.hw.remote import start_profiler

        profiler = start_profiler(get_device(device, devices_file))
        # The device's node receives the models' bytes (already at the deploy precision): it need not see run_dir.
        items = [(records[i]["onnx"], storage.read_bytes(storage.join(run_dir, records[i]["onnx"]), "onnx"),
                  input_shape) for i in todo]
        try:
            timings = profiler.measure(items)
        finally:
            profiler.stop()
        for i, t in zip(todo, timings):
            records[i].update(measured_ms=t["median_ms"], measured_iqr_ms=t["iqr_ms"], measured_runs=t["runs"],
                              measured_reference_ms=t.get("reference_ms"), measured_energy_mj=t.get("energy_mj"),
                              measured_on=t["hostname"], measured_node=t["node_id"], device=device)
            storage.write_json(_record_of(run_dir, i), records[i])
    return [{**rec, **done} for rec, done in zip(chosen, records)]


def deployed_on_actors(checkpoint: str, evaluator: EvaluatorConfig) -> DeployedFn:
    """`deployed(arch_jsons)` for `export_and_measure`: evaluator actors (as many as there are subnets, up to
    the configured number) export each subnet with its own recalibrated BN statistics."""

    def deployed(arch_jsons: list[str]) -> Iterator[tuple[str, tuple[bytes, dict]]]:
        pool = make_evaluator_pool(checkpoint, replace(evaluator, num_actors=min(evaluator.num_actors,
                                                                                 len(arch_jsons))), method="export")
        try:
            yield from pool.map_unordered(arch_jsons)
        finally:
            pool.shutdown()

    return deployed


def _record_of(run_dir: str, i: int) -> str:
    return storage.join(run_dir, "exports", f"subnet_{i}.json")


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _stored_export(location: str, record: str, arch: str) -> dict | None:
    """The stored record of `arch`'s export when it and the ONNX file it vouches for are whole, else None."""
    if not (storage.is_file(record) and storage.is_file(location)):
        return None
    try:
        done = storage.read_json(record, "export record")
    except storage.CorruptFile:
        return None
    if not isinstance(done, dict) or done.get("arch") != arch:
        return None
    return done if _digest(storage.read_bytes(location, "onnx")) == done.get("onnx_sha256") else None


def run_search_job(cfg: dict[str, Any], resume: bool = False) -> dict[str, Any]:
    """Run the configured search end to end; returns a summary (also in the report)."""
    from raynas.hw.energy_model import load_energy_model
    from raynas.hw.latency import load_latency_model
    from raynas.report.pareto_report import write_report
    from raynas.report.references import reference_points
    from raynas.supernets.checkpoint import load_supernet

    if not cfg["checkpoint"]:
        raise ConfigError("checkpoint: required (a supernet trained with `raynas train`)")
    live = cfg["latency"]["model"] == LIVE
    if not cfg["latency"]["lut"] and not live:
        raise ConfigError("latency.lut: required (build one with `raynas profile lut` and `raynas profile calibrate`)"
                          "; or latency.model: live")
    started = time.time()
    run_dir = prepare_run_dir(cfg, resume)
    supernet = load_supernet(cfg["checkpoint"])
    lat = cfg["latency"]
    precision = cfg["deploy"]["precision"]  # latency is predicted, measured and exported at the board's precision
    # live: a LUT, when given, still predicts (an estimate before measuring, kept beside the measurement)
    latency_model = None if live and not lat["lut"] else load_latency_model(
        "lut" if live else lat["model"], lat["lut"], supernet=supernet, device=lat["device"],
        devices_file=lat["devices_file"], precision=precision)
    energy_model = load_energy_model(lat["lut"], supernet, lat["device"], lat["devices_file"], precision,
                                     what="latency.lut") if uses_energy(cfg) else None
    s = cfg["search"]
    ctx = SearchContext(space=supernet.space, estimate=estimate_fn(supernet, latency_model, energy_model),
                        constraints=Constraints(**cfg["constraints"]), objectives=tuple(s["objectives"]),
                        seed=s["seed"])
    ev = cfg["evaluator"]
    evaluator = EvaluatorConfig(data=cfg["data"], **ev, deploy=DeployConfig(**cfg["deploy"]))
    corrected = not live and _corrects(lat)
    found = search_front(run_dir, ctx, s, lat["device"], resume,
                         lambda: make_evaluator_pool(cfg["checkpoint"], evaluator),
                         pool_evaluator,
                         live_latency=(lambda: _live_latency(supernet, lat, precision)) if live or corrected else None,
                         correction=(lambda measure: LiveCorrection(
                             measure, latency_model, _calibration_of(supernet, lat, precision), run_dir, ctx,
                             lat["correction_per_generation"])) if corrected else None)
    records, front = found.records, found.front
    measure_on = lat["device"] if cfg["export"]["measure"] else None

    def export(chosen: list[dict], where: str, precision: str = precision) -> list[dict]:
        return export_and_measure(chosen, where, supernet.input_shape(1),
                                  deployed_on_actors(cfg["checkpoint"], evaluator), measure_on, lat["devices_file"],
                                  precision)

    exported = export(spread_along_front(front, cfg["export"]["top_k"]), run_dir)
    for rec in exported:  # the prediction at the device's speed when it measured (see raynas.hw.measure)
        if rec.get("measured_reference_ms") and latency_model is not None:
            rec["predicted_at_measurement_ms"] = latency_model.predict_at(Arch.from_json(rec["arch"]),
                                                                          rec["measured_reference_ms"])
    if exported:
        storage.write_pandas(storage.join(run_dir, "exported.parquet"), pd.DataFrame(exported))
    summary = {
        "space": supernet.space.name, "algorithm": found.algorithm.name, "budget": s["budget"],
        "evaluations": len(records), "evaluations_reused": found.reused,
        "feasible": sum(r["feasible"] for r in records), "front": len(front),
        "best_accuracy": max((r["accuracy"] for r in front), default=float("nan")),
        "latency_model": lat["model"], "device": lat["device"], "precision": precision,
        "actors": ev["num_actors"],
        "actors_replaced": found.actors_replaced, "profilers_replaced": found.profilers_replaced,
        "live_measured": len(found.live[0]) if found.live else 0,
        "wall_s": round(time.time() - started, 1),
    }
    # The space's reference models, exported and measured as the front was: same device, same precision.
    references = reference_points(supernet.space, ctx.estimate, run_dir, export, precision,
                                  "accuracy_deployed" if cfg["deploy"]["quantized_accuracy"] else "accuracy_supernet")
    report = write_report(run_dir, summary, records, front, exported, found.live, space=supernet.space,
                          references=references)
    log(f"[search] done: {len(records)} evaluations, front of {len(front)}, report {storage.display(report)}")
    return {**summary, "run_dir": run_dir}

