"""Search quality: hypervolume reached by each algorithm at the same evaluation budget, as a fraction of the
hypervolume of the exhaustive Pareto front, on one trained supernet and one latency model.

The space is small enough to evaluate every subnet (default pipelines/configs/search_space_nb201_small.yaml:
3**6 = 729 cells). Stages, each reused when the output directory already holds it:

  1. train   the supernet with raynas.train (Ray Train, uniform single-path sampling) on digits
  2. profile its block LUT + calibration on this machine (device local-cpu, onnxruntime CPU)
  3. exhaustive: every arch evaluated by the real evaluator actors (BN recalibrated on a fixed training
     subset, top-1 on the validation split), stored in a Parquet result store (resumable)
  4. each algorithm x seed runs the real search driver (raynas.search.driver.run_search) with the same
     budget; its evaluations are answered from the exhaustive table, i.e. by the same actors' results.
     The evaluator is deterministic (fixed BN subset and order), which a live spot check re-verifies.

Objectives: accuracy (max) and predicted latency (min) under a latency bound at a quantile of the space's
predicted latencies; hypervolume in the feasible region w.r.t. (accuracy 0, latency bound).

    python benchmarks/search_quality.py --out runs/bench_quality
    python benchmarks/search_quality.py --out runs/bench_quality --budget 60 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = {"warmup_s": 0.05, "min_warmup_runs": 3, "runs": 50, "repeats": 2, "max_rel_iqr": 0.1}
ALGORITHMS = ("nsga2", "coarse-to-fine", "scanedge", "evolution", "random")


def log(msg: str) -> None:
    print(f"[quality] {msg}", file=sys.stderr, flush=True)


def algorithm_params(name: str, population: int, parents: int) -> dict:
    return {
        "nsga2": {"population": population},
        "coarse-to-fine": {"population": population, "parents": parents, "coarse_samples": 2000},
        "evolution": {"population": population, "parents": parents},
        "scanedge": {"population": population, "parents": parents, "top_k": parents,
                     "predictor_candidates": 300},
        "random": {"batch_size": population},
    }[name]


def all_archs(space) -> list:
    return list(dict.fromkeys(space.validate(dict(zip([d.name for d in space.dims], values)))
                              for values in itertools.product(*(d.choices for d in space.dims))))


def train_supernet(args, out: Path) -> Path:
    from raynas.train.trainer import train

    supernet = out / "train" / "quality" / "supernet.pt"
    if supernet.is_file():
        log(f"1 train: reusing {supernet}")
        return supernet
    log(f"1 train: {args.epochs} epochs on Ray Train")
    result = train({
        "space": str(Path(args.space).resolve()), "name": "quality", "storage_path": str((out / "train").resolve()),
        "data": {"name": "digits", "batch_size": 64}, "strategy": "uniform", "epochs": args.epochs,
        "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.0}, "scheduler": {"name": "cosine"},
        "label_smoothing": 0.0, "eval": {"bn_samples": 256, "num_random": 1}, "scaling": {"num_workers": 1},
        "seed": 0,
    })
    return result.supernet_path


def evaluate_exhaustively(checkpoint: Path, archs: list, store_dir: Path, actors: int, bn_samples: int) -> dict:
    """accuracy of every arch, from the evaluator actors (resumes a partial store)."""
    from raynas.search.evaluator import EvaluatorConfig, make_evaluator_pool
    from raynas.search.results import ResultStore

    store = ResultStore(store_dir)
    todo = [a.to_json() for a in archs if a.to_json() not in store]
    log(f"3 exhaustive: {len(archs)} archs, {len(store)} stored, {len(todo)} to evaluate on {actors} actors")
    if todo:
        pool = make_evaluator_pool(str(checkpoint), EvaluatorConfig(data={"name": "digits"}, bn_samples=bn_samples,
                                                                    batch_size=256, num_actors=actors))
        start = time.perf_counter()
        try:
            for i, (arch_json, result) in enumerate(pool.map_unordered(todo), 1):
                store.append({"arch": arch_json, **result})
                if i % 50 == 0 or i == len(todo):
                    log(f"  {i}/{len(todo)} evaluated, {i / (time.perf_counter() - start):.2f}/s")
        finally:
            pool.shutdown()
    return {r["arch"]: r["accuracy"] for r in store.records()}


def spot_check(checkpoint: Path, table: dict, n: int, actors: int, bn_samples: int, seed: int) -> float:
    """Max |live accuracy - table accuracy| over `n` archs re-evaluated on fresh actors."""
    from raynas.search.evaluator import EvaluatorConfig, make_evaluator_pool

    rng = np.random.default_rng(seed)
    archs = list(rng.choice(sorted(table), size=min(n, len(table)), replace=False))
    pool = make_evaluator_pool(str(checkpoint), EvaluatorConfig(data={"name": "digits"}, bn_samples=bn_samples,
                                                                batch_size=256, num_actors=actors))
    try:
        return max(abs(r["accuracy"] - table[a]) for a, r in pool.map_unordered(archs))
    finally:
        pool.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_quality")
    parser.add_argument("--space", default=str(REPO / "pipelines/configs/search_space_nb201_small.yaml"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--budget", type=int, default=80, help="evaluations each algorithm may ask for")
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--parents", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--bn-samples", type=int, default=256)
    parser.add_argument("--max-latency-quantile", type=float, default=0.5,
                        help="latency bound = this quantile of the space's predicted latencies (1 = unbounded)")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    args = parser.parse_args(argv)

    import torch

    from raynas.end_to_end.hw_nas import profile_device
    from raynas.hw.devices import init_local_ray
    from raynas.hw.latency import load_latency_model
    from raynas.search.algorithms import Constraints, SearchContext, build_algorithm
    from raynas.search.driver import estimate_fn, run_search
    from raynas.search.pareto import hypervolume, pareto_front
    from raynas.search.results import ResultStore
    from raynas.supernets.checkpoint import load_supernet

    torch.set_num_threads(1)  # the predictor's tiny nets: more threads only add contention on a small machine
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    init_local_ray(num_cpus=max(2, args.actors))
    timings = {}

    t = time.perf_counter()
    checkpoint = train_supernet(args, out)
    timings["train_s"] = time.perf_counter() - t
    supernet = load_supernet(checkpoint)
    space = supernet.space

    t = time.perf_counter()
    lut = out / "lut.parquet"
    # The project's protocol (>= 50 timed runs, median) with a shorter warm-up: the space has ~1,500 blocks.
    devices = out / "devices.yaml"
    devices.write_text(yaml.safe_dump({"protocol": PROTOCOL, "devices": {"local-cpu": {"runtime": "cpu",
                                                                                       "threads": 1}}}))
    log(f"2 profile: block LUT + calibration of {space.name} on local-cpu")
    profile = profile_device(supernet, "local-cpu", lut, calibration_n=10, devices_file=str(devices),
                             max_archs=20000, patience=1000)
    timings["profile_s"] = time.perf_counter() - t
    latency_model = load_latency_model("lut", lut, supernet=supernet, devices_file=devices)
    estimate = estimate_fn(supernet, latency_model)

    archs = all_archs(space)
    t = time.perf_counter()
    table = evaluate_exhaustively(checkpoint, archs, out / "exhaustive", args.actors, args.bn_samples)
    timings["exhaustive_s"] = time.perf_counter() - t
    t = time.perf_counter()
    spot = spot_check(checkpoint, table, 8, args.actors, args.bn_samples, seed=1)
    timings["spot_check_s"] = time.perf_counter() - t
    log(f"  spot check: max |live - table| accuracy over 8 archs = {spot:.2e}")

    records = [{"arch": a.to_json(), "accuracy": table[a.to_json()], **estimate(a)} for a in archs]
    latencies = np.array([r["latency_ms"] for r in records])
    bounded = args.max_latency_quantile < 1
    bound = float(np.quantile(latencies, args.max_latency_quantile)) if bounded else float(latencies.max() * 1.05)
    constraints = Constraints(max_latency_ms=bound if bounded else None)
    objectives = ("accuracy", "latency_ms")
    ref = [0.0, bound]
    feasible = [r for r in records if constraints.feasible(r)]
    exhaustive_front = pareto_front(feasible, objectives)
    hv_max = hypervolume(exhaustive_front, objectives, ref)
    front_archs = {r["arch"] for r in exhaustive_front}

    def lookup(arch_jsons):
        for a in arch_jsons:
            yield a, {"accuracy": table[a]}

    t = time.perf_counter()
    results = []
    for name in args.algorithms:
        for seed in args.seeds:
            ctx = SearchContext(space=space, estimate=estimate, constraints=constraints, objectives=objectives,
                                seed=seed)
            algo = build_algorithm(name, ctx, args.budget, **algorithm_params(name, args.population, args.parents))
            run_dir = out / "runs" / f"{name}-seed{seed}"
            for part in run_dir.glob("part-*.parquet"):  # a fresh run each time: the table makes it cheap
                part.unlink()
            t_algo = time.perf_counter()
            asked = run_search(algo, lookup, ResultStore(run_dir), progress=lambda m: None)
            unique = list({r["arch"]: r for r in asked}.values())
            ok = [r for r in unique if r["feasible"]]
            hv = hypervolume(pareto_front(ok, objectives), objectives, ref)
            results.append({"algorithm": name, "seed": seed, "asked": len(asked), "evaluated": len(unique),
                            "feasible": len(ok), "hv_fraction": hv / hv_max,
                            "best_accuracy": max((r["accuracy"] for r in ok), default=float("nan")),
                            "front_found": len(front_archs & {r["arch"] for r in ok}),
                            "search_s": time.perf_counter() - t_algo})
            log(f"4 {name} seed {seed}: HV {hv / hv_max:.3f} of exhaustive, {len(unique)} evaluated")
    timings["algorithms_s"] = time.perf_counter() - t

    summary = {
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, load average before {load0[0]:.1f}, "
                   f"after {os.getloadavg()[0]:.1f} (1 min)",
        "space": space.name, "archs": len(archs), "checkpoint": str(checkpoint), "lut_blocks": profile["lut_blocks"],
        "protocol": PROTOCOL,
        "latency_bound_ms": bound if bounded else None, "feasible_archs": len(feasible),
        "exhaustive_front": len(exhaustive_front), "exhaustive_hv": hv_max,
        "accuracy_range": [min(table.values()), max(table.values())],
        "budget": args.budget, "population": args.population, "seeds": args.seeds,
        "spot_check_max_abs_diff": spot, **{k: round(v, 1) for k, v in timings.items()},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    (out / "quality.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=1))
    print(yaml.safe_dump(summary, sort_keys=False))
    print(f"| algorithm | HV / exhaustive HV (mean ± std over {len(args.seeds)} seeds) | min | max | "
          f"evaluated (of {args.budget} asked) | best feasible accuracy | exhaustive-front archs found "
          f"(of {len(exhaustive_front)}) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.algorithms:
        rows = [r for r in results if r["algorithm"] == name]
        hv = [r["hv_fraction"] for r in rows]
        std = statistics.stdev(hv) if len(hv) > 1 else 0.0
        print(f"| {name} | {statistics.fmean(hv):.3f} ± {std:.3f} | {min(hv):.3f} | {max(hv):.3f} | "
              f"{statistics.fmean(r['evaluated'] for r in rows):.1f} | "
              f"{statistics.fmean(r['best_accuracy'] for r in rows):.3f} | "
              f"{statistics.fmean(r['front_found'] for r in rows):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
