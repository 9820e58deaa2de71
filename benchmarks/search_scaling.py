"""Evaluation throughput of the search's evaluator actors: evaluations per second with 1, 2, ... N actors.

An evaluation is what every search candidate costs: BatchNorm recalibration of the subnet on a fixed
training subset, then top-1 on the validation split (raynas.search.evaluator.SubnetEvaluator), on real
Ray actors fed by raynas.search.pool.ActorPool. Actor start-up (loading the checkpoint and the data) is
timed separately; each actor evaluates one warm-up arch before the clock starts.

    python benchmarks/search_scaling.py                        # 1 and 2 actors, nb201 at 32 px on digits
    python benchmarks/search_scaling.py --actors 1 2 4 8 16    # a bigger machine
    python benchmarks/search_scaling.py --device cuda --actors 1 2 4 --address auto   # GPU actors on a cluster

Parallel efficiency = throughput(N) / (N x throughput(1)). Throughput does not depend on the weights,
so without --checkpoint the supernet is freshly initialised (BN statistics are recomputed either way).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
            f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (1/5/15 min)")


def distinct_archs(space, n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    seen: dict = {}
    for _ in range(100 * n):
        if len(seen) >= n:
            break
        seen.setdefault(space.sample(rng), None)
    return list(seen)


def cpu_timed_evaluator():
    """SubnetEvaluator that also reports the CPU seconds its process spent on each evaluation.

    On a shared machine wall time measures the neighbours as much as the evaluator; CPU time per evaluation
    does not, and bounds the throughput an idle machine can reach: min(actors, cores) / cpu_s.
    """
    from raynas.search.evaluator import SubnetEvaluator

    class CpuTimedEvaluator(SubnetEvaluator):
        def evaluate(self, arch_json: str) -> dict:
            cpu = time.process_time()
            result = super().evaluate(arch_json)
            return {**result, "cpu_s": time.process_time() - cpu}

    return CpuTimedEvaluator


def run_one(checkpoint: str, config, archs: list[str], warmup: list[str]) -> dict:
    """Start `config.num_actors` actors, warm each up with one evaluation, then time `archs`."""
    from raynas.search.evaluator import make_evaluator_pool

    t0 = time.perf_counter()
    pool = make_evaluator_pool(checkpoint, config, actor_cls=cpu_timed_evaluator())
    try:
        list(pool.map_unordered(warmup[: config.num_actors]))  # one per actor: all idle at the start
        startup_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        results = [r for _, r in pool.map_unordered(archs)]
        wall_s = time.perf_counter() - t1
    finally:
        pool.shutdown()
    eval_s = [r["eval_s"] for r in results]
    return {"actors": config.num_actors, "startup_s": startup_s, "wall_s": wall_s, "evals": len(results),
            "evals_per_s": len(results) / wall_s, "mean_eval_s": statistics.fmean(eval_s),
            "mean_cpu_s": statistics.fmean(r["cpu_s"] for r in results),
            "workers": len({r["worker"] for r in results})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="nb201", help="built-in space name or space YAML (default nb201)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--checkpoint", help="a trained supernet (default: freshly initialised)")
    parser.add_argument("--data", default="digits", help="dataset name (raynas.data), default digits")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--archs", type=int, default=24, help="timed evaluations per actor count")
    parser.add_argument("--bn-samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (and Ray CPUs) per actor")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: one GPU per actor")
    parser.add_argument("--address", help="an existing Ray cluster (e.g. auto); default: a fresh local Ray")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import ray

    from raynas.hw.devices import init_local_ray
    from raynas.search.evaluator import EvaluatorConfig
    from raynas.space import load_space
    from raynas.supernets import build_supernet
    from raynas.supernets.checkpoint import load_supernet, save_supernet

    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            checkpoint = args.checkpoint
            supernet = load_supernet(checkpoint)
        else:
            supernet = build_supernet(load_space(args.space, resolution=args.resolution, num_classes=10))
            checkpoint = str(save_supernet(supernet, Path(tmp) / "supernet.pt"))
        space = supernet.space
        archs = [a.to_json() for a in distinct_archs(space, args.archs + max(args.actors), args.seed)]
        warmup, timed = archs[: max(args.actors)], archs[max(args.actors):]
        print(f"machine: {machine()}", flush=True)
        print(f"space {space.name} at {space.resolution} px, data {args.data}, {len(timed)} timed evaluations "
              f"(BN recalibration on {args.bn_samples} images + validation), {args.threads} thread(s) per actor, "
              f"device {args.device}", flush=True)
        init_local_ray(address=args.address, num_cpus=None if args.address else max(os.cpu_count() or 1,
                                                                                    max(args.actors) * args.threads))
        print(f"Ray cluster: {ray.cluster_resources().get('CPU', 0):g} CPUs, "
              f"{ray.cluster_resources().get('GPU', 0):g} GPUs", flush=True)
        rows = []
        for n in args.actors:
            config = EvaluatorConfig(data={"name": args.data}, bn_samples=args.bn_samples,
                                     batch_size=args.batch_size, device=args.device, threads=args.threads,
                                     num_actors=n)
            row = run_one(checkpoint, config, timed, warmup)
            rows.append(row)
            print(f"  {n} actor(s): {row['evals_per_s']:.3f} evaluations/s ({row['wall_s']:.1f} s), "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    base = next((r["evals_per_s"] for r in rows if r["actors"] == 1), None)
    cores = int(ray.cluster_resources().get("CPU", 1)) if args.device == "cpu" else None
    print()
    print("| actors | start-up s | wall s | evaluations/s | speed-up | parallel efficiency | wall s per evaluation "
          "| CPU s per evaluation | idle-machine ceiling, evaluations/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        speedup = r["evals_per_s"] / base if base else float("nan")
        ceiling = f"{min(r['actors'], cores) / r['mean_cpu_s']:.3f}" if cores else "-"
        print(f"| {r['actors']} | {r['startup_s']:.1f} | {r['wall_s']:.1f} | {r['evals_per_s']:.3f} | "
              f"{speedup:.2f}x | {speedup / r['actors']:.0%} | {r['mean_eval_s']:.3f} | {r['mean_cpu_s']:.3f} | "
              f"{ceiling} |")
    print("\nceiling = min(actors, Ray CPUs) / CPU s per evaluation: what the actors would reach with the cores "
          "to themselves (an estimate; the measured columns are wall clock on this machine as it was).")
    print(f"\nmachine after: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
