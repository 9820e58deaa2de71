"""How accurate are the latency models? Both LUT build methods, then every model against measured held-out subnets.

    python benchmarks/latency_models.py                                  # the issue's three spaces
    python benchmarks/latency_models.py --spaces scanedge@160,autovit-xxs --validate-n 100 --out runs/bench_latency

`NAME@RES` profiles a space at another input resolution (the paper resolution is slow on a small CPU).
For each space on the device:
  1. build the per-block LUT with each `--methods` (isolated: a session per block; context: whole subnets
     profiled per node), timed (reused from --out unless --fresh);
  2. measure `--calibration-n` subnets once and `--validate-n` held-out subnets twice (the second time in
     reverse order: the device's self-agreement), the same measurements serving every LUT, so the methods
     are compared on identical ground truth;
  3. print per method the `raynas profile validate` figures of every model (Spearman, MAPE %, share within
     +-10%), with the LUT model also scored without the reference (raw times everywhere).
One JSON object per space and method (also saved as <out>/<space>@<res>.<method>.summary.json), then
Markdown tables. Measured, never part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

DEFAULT_SPACES = "scanedge,autovit-xxs,mbv3-biglittle"


def parse_space(text: str) -> tuple[str, int | None]:
    name, _, res = text.partition("@")
    return name, int(res) if res else None


def _lut(supernet, profiler, out: Path, tag: str, method: str, args) -> tuple:
    """The space's LUT built with `method` (or the stored one), with its build time and block count."""
    from raynas.hw.lut import TableKey, build_lut, read_lut, select, write_lut

    path = out / f"{tag}.{method}.lut.parquet"
    existing, existing_meta = (None, None) if args.fresh else read_lut(path)
    print(f"[bench] {tag}: LUT ({method})", file=sys.stderr, flush=True)
    rows, meta = build_lut(supernet, [profiler], existing, existing_meta, seed=args.seed, patience=args.patience,
                           max_archs=args.max_archs, method=method, appearances=args.appearances)
    write_lut(path, rows, meta)
    key = TableKey.of(supernet, profiler.device)
    return select(rows, key), meta[key.id]


def run(args) -> list[dict]:
    import onnxruntime as ort
    import torch

    from raynas.hw.devices import get_device, init_local_ray
    from raynas.hw.profiling import (
        calibration_archs,
        fit_calibration,
        held_out_archs,
        measure_subnets,
        summarize_validation,
    )
    from raynas.hw.remote import start_profiler
    from raynas.space import load_space
    from raynas.supernets import build_supernet

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = get_device(args.device, args.devices_file)
    overrides = {k: v for k, v in (("repeats", args.repeats), ("warmup_s", args.warmup_s),
                                   ("min_run_s", args.min_run_s)) if v is not None}
    if overrides:
        device = replace(device, protocol=replace(device.protocol, **overrides).validate("protocol"))
    machine = (f"{platform.machine()} {platform.node()}, {os.cpu_count()} cores, onnxruntime {ort.__version__}, "
               f"{device.threads} thread(s), clock {device.protocol.clock}")
    init_local_ray(address=args.address)
    profiler = start_profiler(device)
    results = []
    try:
        for text in args.spaces.split(","):
            name, resolution = parse_space(text.strip())
            supernet = build_supernet(load_space(name, resolution=resolution)).eval()
            tag = f"{supernet.space.name}@{supernet.space.resolution}"
            luts = {}
            for method in args.methods.split(","):
                t0 = time.perf_counter()
                table, info = _lut(supernet, profiler, out, tag, method, args)
                luts[method] = (table, info, time.perf_counter() - t0)
            t1 = time.perf_counter()
            calib = calibration_archs(supernet.space, args.calibration_n, args.seed)
            calib_records = measure_subnets(supernet, calib, [profiler], desc="calibration subnets")[device.name]
            held = held_out_archs(supernet.space, args.validate_n, args.seed + 1, exclude=calib)
            first = measure_subnets(supernet, held, [profiler], desc="held-out subnets")[device.name]
            again = measure_subnets(supernet, held[::-1], [profiler], desc="held-out again")[device.name][::-1]
            measure_s = time.perf_counter() - t1
            for method, (table, info, step_s) in luts.items():
                record = fit_calibration(supernet, table, calib, calib_records, args.seed)
                summary, per_arch = summarize_validation(supernet, table, record, device, held, first,
                                                         args.seed + 1, info["build_s"], again)
                per_arch.to_parquet(out / f"{tag}.{method}.validation.parquet", index=False)
                summary.update(method=method, subnets_profiled=info.get("subnets", 0),
                               lut_blocks_measured_now=info["measured"], lut_step_s=round(step_s, 1),
                               subnet_measurement_s=round(measure_s, 1), machine=machine)
                print(json.dumps(summary), flush=True)
                results.append(summary)
                (out / f"{tag}.{method}.summary.json").write_text(json.dumps(summary, indent=1))
    finally:
        profiler.stop()
    return results


def markdown(results: list[dict]) -> str:
    lines = ["| space @ res | LUT method | blocks (subnets) | LUT build s | model | Spearman | MAPE % | within ±10% |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        models = dict(r["models"])
        if r.get("lut_without_reference"):
            models["lut, no reference"] = r["lut_without_reference"]
        for kind, m in models.items():
            lines.append(f"| {r['space']} @ {r['resolution']} | {r['method']} | {r['lut_blocks']} "
                         f"({r['subnets_profiled']}) | {r['lut_build_s']} | {kind} | {m['spearman']} | {m['mape']} | "
                         f"{m['within10']} |")
    lines += ["", "| space @ res | calib n | held-out n | self-agreement ±10% (reference) | (raw) | reference ms |",
              "|---|---|---|---|---|---|"]
    seen = set()
    for r in results:
        if r["space"] in seen:
            continue
        seen.add(r["space"])
        lines.append(f"| {r['space']} @ {r['resolution']} | {r['calibration_n']} | {r['n']} | "
                     f"{r.get('self_agreement')} | {r.get('self_agreement_raw')} | {r.get('reference_ms')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spaces", default=DEFAULT_SPACES, help="comma-separated NAME or NAME@RESOLUTION")
    parser.add_argument("--methods", default="isolated,context", help="LUT build methods to compare")
    parser.add_argument("--appearances", type=int, default=2, help="context method: subnets each block is timed in")
    parser.add_argument("--device", default="local-cpu")
    parser.add_argument("--devices-file")
    parser.add_argument("--address")
    parser.add_argument("--calibration-n", type=int, default=10)
    parser.add_argument("--validate-n", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patience", type=int, default=300)
    parser.add_argument("--max-archs", type=int, default=3000)
    parser.add_argument("--repeats", type=int, help="override the device protocol's repeats")
    parser.add_argument("--warmup-s", type=float, help="override the device protocol's warm-up seconds")
    parser.add_argument("--min-run-s", type=float, help="override the device protocol's least timed seconds")
    parser.add_argument("--out", default="runs/bench_latency", help="LUTs and results (LUTs reused)")
    parser.add_argument("--fresh", action="store_true", help="rebuild LUTs from scratch")
    args = parser.parse_args(argv)
    results = run(args)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
