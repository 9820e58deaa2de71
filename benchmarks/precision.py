"""INT8 against FP32 on one device: latency and size of whole subnets, and how well the INT8 latency model predicts.

    python benchmarks/precision.py                                   # the issue's figures (mbv3-biglittle @ 224)
    python benchmarks/precision.py --n 3 --held-out 8 --calibration-n 4 --patience 20 --max-archs 40   # quick try

On the device (default local-cpu: onnxruntime's CPU provider, which runs int8 QDQ models with its int8 kernels):
  1. `--n` random subnets at the space's largest resolution (224 px), each measured whole at fp32 and at int8
     back to back (in alternating order; the profiler converts the exported FP32 subnet on the device,
     raynas.hw.precision: per-channel static QDQ, seeded calibration inputs). Per subnet: the int8/fp32 latency
     ratio of the two medians as measured (seconds apart, so the host's drift barely moves it) and also with
     each stated at the reference speed (raynas.hw.measure.ReferenceClock), and the model size in MB.
  2. the int8 latency models: the per-block LUT built at int8 (stored in --out and reused unless --fresh),
     calibrated on `--calibration-n` subnets and validated on `--held-out` other subnets measured at int8:
     Spearman, MAPE and share within +-10% of every model (`raynas profile validate --precision int8`).
     `--model-precisions fp32,int8` does the same at fp32 beside it.
  3. with `--checkpoint` (a supernet trained on `--data`, e.g. the demo's mbv3-biglittle on digits): the
     validation accuracy of `--n` random subnets deployed at fp32 and at int8 (as the search's evaluator
     actors write them: BN recalibrated, INT8 calibrated on 64 training images; raynas.search.deployed).
One JSON object per part, then Markdown tables. Measured, never part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from latency_models import parse_space  # benchmarks/ is on the path of a script run from it


def _spread(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"median": round(float(np.median(v)), 4), "min": round(float(v.min()), 4),
            "max": round(float(v.max()), 4), "n": len(v)}


def ratio_part(supernet, profiler, args) -> dict:
    """Whole subnets at the largest resolution, fp32 then int8, on the one profiler."""
    from raynas.hw.profiling import measure_subnets

    space = supernet.space
    largest = space.max_arch().to_dict()["resolution"]
    rng = np.random.default_rng([args.seed, 7])
    archs = list(dict.fromkeys(space.validate({**space.sample(rng).to_dict(), "resolution": largest})
                               for _ in range(args.n)))
    measured: dict[str, list[dict]] = {"fp32": [], "int8": []}
    for i, arch in enumerate(archs):
        for p in ("fp32", "int8") if i % 2 == 0 else ("int8", "fp32"):
            (record,) = measure_subnets(supernet, [arch], [profiler], show_progress=False, precision=p)[
                profiler.device.name]
            measured[p].append(record)
        print(f"[bench] subnet {i + 1}/{len(archs)}: fp32 {measured['fp32'][-1]['median_ms']:.3f} ms, "
              f"int8 {measured['int8'][-1]['median_ms']:.3f} ms", file=sys.stderr, flush=True)

    def steady(r: dict) -> float:  # ms per reference call: the device's speed cancels out of the ratio
        return r["median_ms"] / r["reference_ms"] if r.get("reference_ms") else r["median_ms"]

    fp32, int8 = measured["fp32"], measured["int8"]
    return {
        "part": "int8/fp32 whole subnets", "space": space.name, "resolution": largest, "n": len(archs),
        "fp32_ms": _spread([r["median_ms"] for r in fp32]), "int8_ms": _spread([r["median_ms"] for r in int8]),
        "ratio": _spread([q["median_ms"] / f["median_ms"] for f, q in zip(fp32, int8)]),
        "ratio_at_reference": _spread([steady(q) / steady(f) for f, q in zip(fp32, int8)]),
        "fp32_mb": _spread([r["size_mb"] for r in fp32]), "int8_mb": _spread([r["size_mb"] for r in int8]),
        "size_ratio": _spread([q["size_mb"] / f["size_mb"] for f, q in zip(fp32, int8)]),
        "rel_iqr_fp32": _spread([r["iqr_ms"] / r["median_ms"] for r in fp32]),
        "rel_iqr_int8": _spread([r["iqr_ms"] / r["median_ms"] for r in int8]),
        "per_subnet": [{"arch": a.to_json(), "fp32_ms": f["median_ms"], "int8_ms": q["median_ms"],
                        "fp32_mb": f["size_mb"], "int8_mb": q["size_mb"]} for a, f, q in zip(archs, fp32, int8)],
    }


def model_part(supernet, profiler, precision: str, out: Path, args) -> dict:
    """The latency models at `precision`: LUT (reused from `out`), calibration, held-out validation."""
    from raynas.hw.lut import TableKey, build_lut, read_lut, select
    from raynas.hw.profiling import calibrate, validate

    space = supernet.space
    lut = out / f"{space.name}@{space.resolution}.lut.parquet"
    existing, existing_meta = (None, None) if args.fresh else read_lut(lut)
    t0 = time.perf_counter()
    rows, meta = build_lut(supernet, [profiler], existing, existing_meta, seed=args.seed, patience=args.patience,
                           max_archs=args.max_archs, method=args.method, out=str(lut), precision=precision)
    lut_s = time.perf_counter() - t0
    key = TableKey.of(supernet, profiler.device, precision)
    table, info = select(rows, key), meta[key.id]
    calibration = calibrate(supernet, table, profiler, args.calibration_n, args.seed, precision=precision)
    summary, per_arch = validate(supernet, table, calibration, profiler, args.held_out, args.seed, info["build_s"],
                                 recheck=not args.no_recheck, precision=precision)
    per_arch.to_parquet(out / f"{space.name}@{space.resolution}.{precision}.validation.parquet", index=False)
    summary.update(part=f"{precision} latency models", method=args.method, lut_blocks_measured_now=info["measured"],
                   lut_step_s=round(lut_s, 1))
    return summary


def accuracy_part(args) -> dict:
    """Validation accuracy of `--n` random subnets of the checkpoint, deployed at fp32 and at int8."""
    from raynas import storage
    from raynas.search.deployed import DeployConfig
    from raynas.search.evaluator import EvaluatorConfig, SubnetEvaluator

    checkpoint = storage.read_bytes(args.checkpoint, "--checkpoint")
    evaluators = {p: SubnetEvaluator(checkpoint, EvaluatorConfig(data={"name": args.data},
                                                                 deploy=DeployConfig(precision=p)))
                  for p in ("fp32", "int8")}
    space = evaluators["fp32"].supernet.space
    rng = np.random.default_rng([args.seed, 11])
    archs = list(dict.fromkeys(space.sample(rng) for _ in range(args.n)))
    rows = []
    for i, arch in enumerate(archs):
        (_, fp32), (_, int8) = (evaluators[p].export(arch.to_json()) for p in ("fp32", "int8"))
        rows.append({"fp32": fp32["accuracy_deployed"], "int8": int8["accuracy_deployed"],
                     "supernet": fp32["accuracy_supernet"], "fp32_mb": fp32["size_mb"], "int8_mb": int8["size_mb"]})
        print(f"[bench] accuracy {i + 1}/{len(archs)}: fp32 {rows[-1]['fp32']:.4f}, int8 {rows[-1]['int8']:.4f}",
              file=sys.stderr, flush=True)
    change = [100 * (r["int8"] - r["fp32"]) for r in rows]
    return {"space": space.name, "resolution": space.resolution, "data": args.data, "n": len(rows),
            "accuracy_fp32": _spread([r["fp32"] for r in rows]), "accuracy_int8": _spread([r["int8"] for r in rows]),
            "change_points": _spread(change), "fp32_mb": _spread([r["fp32_mb"] for r in rows]),
            "int8_mb": _spread([r["int8_mb"] for r in rows]), "per_subnet": rows}


def markdown(ratio: dict, models: list[dict]) -> str:
    r = ratio
    lines = [f"| {r['space']} @ {r['resolution']} px, n={r['n']} | median | min | max |", "|---|---|---|---|"]
    for label, key in (("fp32 ms", "fp32_ms"), ("int8 ms", "int8_ms"), ("int8/fp32 latency", "ratio"),
                       ("int8/fp32 latency, each at the reference speed", "ratio_at_reference"),
                       ("fp32 MB", "fp32_mb"), ("int8 MB", "int8_mb"), ("int8/fp32 size", "size_ratio"),
                       ("IQR/median fp32", "rel_iqr_fp32"), ("IQR/median int8", "rel_iqr_int8")):
        s = r[key]
        lines.append(f"| {label} | {s['median']} | {s['min']} | {s['max']} |")
    if models:
        lines += ["", "| precision | model | held-out n | calib n | Spearman | MAPE % | within ±10% |",
                  "|---|---|---|---|---|---|---|"]
        for m in models:
            for kind, v in m["models"].items():
                lines.append(f"| {m['precision']} | {kind} | {m['n']} | {m['calibration_n']} | {v['spearman']} | "
                             f"{v['mape']} | {v['within10']} |")
        lines += ["", "| precision | LUT blocks | LUT build s | missing keys | self-agreement ±10% |",
                  "|---|---|---|---|---|"]
        for m in models:
            lines.append(f"| {m['precision']} | {m['lut_blocks']} | {m['lut_build_s']} | {m['missing_keys']} | "
                         f"{m.get('self_agreement')} |")
    return "\n".join(lines)


def run(args) -> tuple[dict, list[dict]]:
    import onnxruntime as ort
    import torch

    from raynas.hw.devices import get_device, init_local_ray
    from raynas.hw.remote import start_profiler
    from raynas.space import load_space
    from raynas.supernets import build_supernet

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = get_device(args.device, args.devices_file)
    precisions = [p.strip() for p in args.model_precisions.split(",") if p.strip()]
    for p in ("int8", *precisions):
        device.check_precision(p, "--model-precisions")
    name, resolution = parse_space(args.space)
    supernet = build_supernet(load_space(name, resolution=resolution)).eval()
    machine = (f"{platform.machine()} {platform.node()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
               f"onnxruntime {ort.__version__}, {device.threads} thread(s), clock {device.protocol.clock}")
    init_local_ray(address=args.address)
    profiler = start_profiler(device)
    try:
        ratio = ratio_part(supernet, profiler, args)
        ratio["machine"] = machine
        print(json.dumps({k: v for k, v in ratio.items() if k != "per_subnet"}), flush=True)
        models = []
        for precision in precisions if args.held_out > 0 else []:
            summary = model_part(supernet, profiler, precision, out, args)
            summary["machine"] = machine
            print(json.dumps(summary), flush=True)
            models.append(summary)
    finally:
        profiler.stop()
    accuracy = accuracy_part(args) if args.checkpoint else None
    if accuracy:
        print(json.dumps({k: v for k, v in accuracy.items() if k != "per_subnet"}), flush=True)
    tag = f"{supernet.space.name}@{supernet.space.resolution}"
    (out / f"{tag}.precision.json").write_text(json.dumps({"ratio": ratio, "models": models,
                                                           "accuracy": accuracy}, indent=1))
    return ratio, models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="mbv3-biglittle", help="NAME or NAME@RESOLUTION (default: 224 px)")
    parser.add_argument("--n", type=int, default=10, help="subnets measured whole at fp32 and int8")
    parser.add_argument("--held-out", type=int, default=50, help="held-out subnets validating the models (0: skip)")
    parser.add_argument("--calibration-n", type=int, default=10)
    parser.add_argument("--model-precisions", default="int8", help="latency models to build and validate")
    parser.add_argument("--method", default="isolated", help="LUT build method: isolated or context")
    parser.add_argument("--no-recheck", action="store_true", help="measure the held-out subnets once only")
    parser.add_argument("--patience", type=int, default=300, help="LUT: subnets in a row without a new block")
    parser.add_argument("--max-archs", type=int, default=3000, help="LUT: most subnets scanned for blocks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="local-cpu", help="a device that runs int8")
    parser.add_argument("--devices-file", help="devices YAML (its protocol is the one measured with)")
    parser.add_argument("--address", help="Ray address (default: a local Ray labelled device=local-cpu)")
    parser.add_argument("--out", default="runs/bench_precision", help="LUTs and results (LUTs reused)")
    parser.add_argument("--fresh", action="store_true", help="rebuild the LUTs from scratch")
    parser.add_argument("--checkpoint", help="a trained supernet: accuracy at fp32 and int8 of --n subnets")
    parser.add_argument("--data", default="digits", help="the checkpoint's dataset (accuracy part)")
    args = parser.parse_args(argv)
    ratio, models = run(args)
    print(markdown(ratio, models))
    return 0


if __name__ == "__main__":
    sys.exit(main())
