"""Live latency in the search loop: how fast candidates are measured live, and how close a live-corrected LUT
model's predictions come to what the device measures on the final front.

    python benchmarks/live_search.py --checkpoint runs/demo/train/supernet/supernet.pt --lut runs/demo/lut.parquet

Two searches of the same budget from the same checkpoint (a `raynas demo` run's by default), on the device:
  1. `latency.model: live`: every candidate measured; prints candidates measured per minute.
  2. `latency.model: lut` with `latency.correction: on`: prints, over the final (all measured) front, the
     share within +-10% of the measurement for the model as calibrated before the search and after it.
Measured, never part of the test run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _config(args, run_dir: Path, **latency) -> dict:
    from raynas.search.config import validate_search_config

    return validate_search_config({
        "checkpoint": args.checkpoint, "run_dir": str(run_dir), "data": {"name": "digits"},
        "evaluator": {"num_actors": args.actors, "bn_samples": 256, "batch_size": 256},
        "latency": {"device": args.device, "devices_file": args.devices_file, **latency},
        "search": {"algorithm": "nsga2", "budget": args.budget, "seed": args.seed,
                   "params": {"population": args.population}},
        "export": {"top_k": 0, "measure": False},
    })


def _within(predicted, measured) -> float:
    pairs = list(zip(predicted, measured))
    return sum(abs(p - m) <= 0.1 * m for p, m in pairs) / len(pairs) if pairs else float("nan")


def run(args) -> dict:
    import pandas as pd

    from raynas.hw.latency import Affine, load_latency_model
    from raynas.search.runner import run_search_job
    from raynas.space import Arch
    from raynas.supernets.checkpoint import load_supernet

    out = Path(args.out)
    t0 = time.perf_counter()
    live = run_search_job(_config(args, out / "live", model="live"))
    live_s = time.perf_counter() - t0
    rows = pd.read_parquet(Path(live["run_dir"]) / "evaluations.parquet")

    t0 = time.perf_counter()
    corrected = run_search_job(_config(args, out / "corrected", model="lut", lut=args.lut, correction="on",
                                       correction_per_generation=args.per_generation))
    corrected_s = time.perf_counter() - t0
    front = pd.read_parquet(Path(corrected["run_dir"]) / "front.parquet")
    history = pd.read_parquet(Path(corrected["run_dir"]) / "live_calibration.parquet")
    model = load_latency_model("lut", args.lut, supernet=load_supernet(args.checkpoint), device=args.device,
                               devices_file=args.devices_file)  # as calibrated before the search
    predicted_before = [model.predict(Arch.from_json(a)) for a in front["arch"]]
    model.calibration = Affine(float(history["slope"].iloc[-1]), float(history["intercept"].iloc[-1]))
    predicted_after = [model.predict(Arch.from_json(a)) for a in front["arch"]]
    summary = {
        "live": {"evaluations": live["evaluations"], "wall_s": round(live_s, 1),
                 "measured_per_min": round(60 * len(rows) / live_s, 1)},
        "corrected": {"evaluations": corrected["evaluations"], "wall_s": round(corrected_s, 1),
                      "live_measured": corrected["live_measured"], "front": len(front),
                      "front_measured": int((front["latency_source"] == "measured").sum()),
                      "front_within10_before": _within(predicted_before, front["latency_ms"]),
                      "front_within10_after": _within(predicted_after, front["latency_ms"]),
                      "kappa": [float(history["slope"].iloc[0]), float(history["slope"].iloc[-1])],
                      "epsilon": [float(history["intercept"].iloc[0]), float(history["intercept"].iloc[-1])]},
    }
    print(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/demo/train/supernet/supernet.pt")
    parser.add_argument("--lut", default="runs/demo/lut.parquet")
    parser.add_argument("--device", default="local-cpu")
    parser.add_argument("--devices-file")
    parser.add_argument("--budget", type=int, default=60)
    parser.add_argument("--population", type=int, default=12)
    parser.add_argument("--per-generation", type=int, default=4)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench_live")
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
