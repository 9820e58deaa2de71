"""`raynas search`: from a trained supernet and a latency model to exported Pareto-optimal subnets.

run_dir (a local path or a URI such as s3://bucket/prefix; every file goes through raynas.storage)/
  config.yaml              the validated config
  evaluations/part-*.parquet  one file per finished evaluation (append-only; `--resume` reads them)
  evaluations.parquet      all evaluations, compacted at the end
  front.parquet            the Pareto front (feasible evaluations only)
  onnx/*.onnx              the exported subnets, verified against PyTorch
  exported.parquet         exported subnets: predicted vs measured latency on the target device
  report.md, pareto.png    the report
"""

from __future__ import annotations

import sys
import time
from typing import Any

import pandas as pd
import yaml

from raynas import storage
from raynas.errors import ConfigError
from raynas.search.algorithms import Constraints, SearchContext, build_algorithm
from raynas.search.driver import estimate_fn, run_search
from raynas.search.evaluator import EvaluatorConfig, make_evaluator_pool, pool_evaluator
from raynas.search.pareto import pareto_front
from raynas.search.results import ResultStore, part_files
from raynas.space import Arch


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


def spread_along_front(front: list[dict], k: int) -> list[dict]:
    """k front members evenly spaced by rank along the front (ends always included)."""
    if k <= 0 or not front:
        return []
    if len(front) <= k:
        return list(front)
    idx = sorted({round(i * (len(front) - 1) / (k - 1)) for i in range(k)}) if k > 1 else [len(front) - 1]
    return [front[i] for i in idx]


def export_and_measure(supernet, chosen: list[dict], run_dir: str, device: str | None,
                       devices_file: str | None) -> list[dict]:
    """Export each chosen subnet to verified ONNX in run_dir/onnx; measure it on the target device's node.

    Each record's `onnx` is relative to run_dir, so the run reads the same wherever it is copied.
    """
    from raynas.hw.onnx_export import export_onnx

    exported, models = [], []
    for i, rec in enumerate(chosen):
        relative = f"onnx/subnet_{i}.onnx"
        location = storage.join(run_dir, *relative.split("/"))
        subnet = supernet.extract(Arch.from_json(rec["arch"]))
        check = export_onnx(subnet, supernet.input_shape(1), location)
        exported.append({**rec, "onnx": relative, "onnx_max_abs_diff": check["max_abs_diff"]})
        models.append(location)
    if device and exported:
        import ray

        from raynas.hw.devices import get_device
        from raynas.hw.remote import start_profiler

        profiler = start_profiler(get_device(device, devices_file))
        # The device's node receives the models' bytes: it need not see run_dir.
        items = [(e["onnx"], storage.read_bytes(m, "onnx"), supernet.input_shape(1)) for e, m in zip(exported, models)]
        try:
            timings = ray.get(profiler.actor.measure.remote(items))
        finally:
            profiler.stop()
        for e, t in zip(exported, timings):
            e.update(measured_ms=t["median_ms"], measured_iqr_ms=t["iqr_ms"], measured_runs=t["runs"],
                     measured_on=t["hostname"], measured_node=t["node_id"], device=device)
    return exported


def run_search_job(cfg: dict[str, Any], resume: bool = False) -> dict[str, Any]:
    """Run the configured search end to end; returns a summary (also in the report)."""
    from raynas.hw.devices import init_local_ray
    from raynas.hw.latency import load_latency_model
    from raynas.report.pareto_report import write_report
    from raynas.supernets.checkpoint import load_supernet

    if not cfg["checkpoint"]:
        raise ConfigError("checkpoint: required (a supernet trained with `raynas train`)")
    if not cfg["latency"]["lut"]:
        raise ConfigError("latency.lut: required (build one with `raynas profile lut` and `raynas profile calibrate`)")
    started = time.time()
    run_dir = prepare_run_dir(cfg, resume)
    supernet = load_supernet(cfg["checkpoint"])
    lat = cfg["latency"]
    latency_model = load_latency_model(lat["model"], lat["lut"], supernet=supernet, device=lat["device"],
                                       devices_file=lat["devices_file"])
    s = cfg["search"]
    ctx = SearchContext(space=supernet.space, estimate=estimate_fn(supernet, latency_model),
                        constraints=Constraints(**cfg["constraints"]), objectives=tuple(s["objectives"]),
                        seed=s["seed"])
    algorithm = build_algorithm(s["algorithm"], ctx, s["budget"], **s["params"])
    store = ResultStore(storage.join(run_dir, "evaluations"))
    if resume and len(store):
        log(f"[search] resuming: {len(store)} evaluations already stored in {storage.display(run_dir)}")

    init_local_ray(devices=[lat["device"]])
    ev = cfg["evaluator"]
    pool = make_evaluator_pool(cfg["checkpoint"], EvaluatorConfig(data=cfg["data"], **ev))
    try:
        asked = run_search(algorithm, pool_evaluator(pool), store, progress=log)
    finally:
        pool.shutdown()

    records = list({r["arch"]: r for r in asked}.values())
    store.compact(storage.join(run_dir, "evaluations.parquet"))
    front = pareto_front([r for r in records if r["feasible"]], ctx.objectives)
    storage.write_pandas(storage.join(run_dir, "front.parquet"), pd.DataFrame(front))
    chosen = spread_along_front(front, cfg["export"]["top_k"])
    exported = export_and_measure(supernet, chosen, run_dir, lat["device"] if cfg["export"]["measure"] else None,
                                  lat["devices_file"])
    if exported:
        storage.write_pandas(storage.join(run_dir, "exported.parquet"), pd.DataFrame(exported))
    summary = {
        "space": supernet.space.name, "algorithm": algorithm.name, "budget": s["budget"],
        "evaluations": len(records), "feasible": sum(r["feasible"] for r in records), "front": len(front),
        "best_accuracy": max((r["accuracy"] for r in front), default=float("nan")),
        "latency_model": lat["model"], "device": lat["device"], "actors": ev["num_actors"],
        "actors_replaced": pool.replaced, "wall_s": round(time.time() - started, 1),
    }
    report = write_report(run_dir, summary, records, front, exported)
    log(f"[search] done: {len(records)} evaluations, front of {len(front)}, report {storage.display(report)}")
    return {**summary, "run_dir": run_dir}

