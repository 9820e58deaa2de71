"""How accurate are the latency models? LUT build time, then each model against measured held-out subnets.

    python benchmarks/latency_models.py                                  # the issue's three spaces
    python benchmarks/latency_models.py --spaces scanedge@160,autovit-xxs --validate-n 100 --out runs/bench_latency

`NAME@RES` profiles a space at another input resolution (the paper resolution is slow on a small CPU).
For each space on the device: build (or reuse, from --out) the per-block LUT, calibrate every model on
`--calibration-n` measured subnets, measure `--validate-n` other random subnets and print the
`raynas profile validate` figures of every model (Spearman, MAPE %, share within +-10%), one JSON object
per space (also saved as <out>/<space>@<res>.summary.json), then a Markdown table. Measured, never part of
the test run.
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


def run(args) -> list[dict]:
    import onnxruntime as ort
    import torch

    from raynas.hw.devices import get_device, init_local_ray
    from raynas.hw.latency import calibration_path, load_calibration, save_calibration
    from raynas.hw.lut import TableKey, build_lut, read_lut, select, write_lut
    from raynas.hw.profiling import calibrate, validate
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
    init_local_ray(address=args.address)
    profiler = start_profiler(device)
    results = []
    try:
        for text in args.spaces.split(","):
            name, resolution = parse_space(text.strip())
            supernet = build_supernet(load_space(name, resolution=resolution)).eval()
            tag = f"{supernet.space.name}@{supernet.space.resolution}"
            lut_path = out / f"{tag}.lut.parquet"
            key = TableKey.of(supernet, device)
            existing, existing_meta = (None, None) if args.fresh else read_lut(lut_path)
            print(f"[bench] {tag}: LUT on {device.name}", file=sys.stderr)
            t0 = time.perf_counter()
            rows, meta = build_lut(supernet, [profiler], existing, existing_meta, seed=args.seed,
                                   patience=args.patience, max_archs=args.max_archs, passes=args.passes)
            write_lut(lut_path, rows, meta)
            table = select(rows, key)
            calib_file = calibration_path(lut_path)
            record = None if args.fresh or args.recalibrate else load_calibration(calib_file, key)
            t1 = time.perf_counter()
            if record is None:
                record = calibrate(supernet, table, profiler, args.calibration_n, args.seed, passes=args.passes)
                save_calibration(calib_file, key, record)
            t2 = time.perf_counter()
            summary, per_arch = validate(supernet, table, record, profiler, args.validate_n, args.seed + 1,
                                         lut_build_s=meta[key.id]["build_s"], passes=args.passes)
            t3 = time.perf_counter()
            per_arch.to_parquet(out / f"{tag}.validation.parquet", index=False)
            summary.update(
                lut_blocks_measured_now=meta[key.id]["measured"], archs_scanned=meta[key.id]["archs_scanned"],
                lut_step_s=round(t1 - t0, 1), calibration_step_s=round(t2 - t1, 1),
                validation_step_s=round(t3 - t2, 1), machine=f"{platform.machine()} {platform.node()}, "
                f"{os.cpu_count()} cores, onnxruntime {ort.__version__}, {device.threads} thread(s)")
            print(json.dumps(summary), flush=True)
            results.append(summary)
            (out / f"{tag}.summary.json").write_text(json.dumps(summary, indent=1))
    finally:
        profiler.stop()
    return results


def markdown(results: list[dict]) -> str:
    lines = ["| space @ res | blocks | LUT build s | calib n | held-out n | model | Spearman | MAPE % | within ±10% |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for kind, m in r["models"].items():
            lines.append(f"| {r['space']} @ {r['resolution']} | {r['lut_blocks']} | {r['lut_build_s']} | "
                         f"{r['calibration_n']} | {r['n']} | {kind} | {m['spearman']} | {m['mape']} | "
                         f"{m['within10']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spaces", default=DEFAULT_SPACES, help="comma-separated NAME or NAME@RESOLUTION")
    parser.add_argument("--device", default="local-cpu")
    parser.add_argument("--devices-file")
    parser.add_argument("--address")
    parser.add_argument("--calibration-n", type=int, default=10)
    parser.add_argument("--validate-n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patience", type=int, default=300)
    parser.add_argument("--max-archs", type=int, default=3000)
    parser.add_argument("--passes", type=int, default=1,
                        help="measurement passes of LUT, calibration and held-out subnets (median kept)")
    parser.add_argument("--repeats", type=int, help="override the device protocol's repeats")
    parser.add_argument("--warmup-s", type=float, help="override the device protocol's warm-up seconds")
    parser.add_argument("--min-run-s", type=float, help="override the device protocol's least timed seconds")
    parser.add_argument("--out", default="runs/bench_latency", help="LUTs, calibrations and results (reused)")
    parser.add_argument("--fresh", action="store_true", help="rebuild LUTs and calibrations from scratch")
    parser.add_argument("--recalibrate", action="store_true", help="reuse LUTs but measure a new calibration")
    args = parser.parse_args(argv)
    results = run(args)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
