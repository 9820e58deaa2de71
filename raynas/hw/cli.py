"""`raynas profile devices|lut|calibrate|validate`: measure devices of the Ray cluster, build and check LUTs.

Machine-readable JSON goes to stdout (one object; one per line when several devices are given), progress
to stderr. Without `--address` / `RAY_ADDRESS`, a local Ray is started whose node is labelled
`device=local-cpu`. `--lut`, `--out`, `--calibration` and `--save` are local paths or URIs (s3://...),
read and written through raynas.storage. `--precision` (default fp32) is the precision the device runs the
models at: LUT groups and calibrations are kept per precision, side by side in the same files.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager

from raynas import storage
from raynas.cli_args import POSITIVE, SEED, integer
from raynas.errors import UserError
from raynas.hw.devices import LUT_METHODS


def _common(p: argparse.ArgumentParser, lut_required: bool) -> None:
    p.add_argument("--space", required=True, help="built-in space name or a space YAML file")
    p.add_argument("--device", default="local-cpu",
                   help="declared device name (cluster/devices.yaml); several comma-separated run in parallel")
    if lut_required:
        p.add_argument("--lut", required=True, help="the LUT Parquet file built by `raynas profile lut` (path or URI)")
    p.add_argument("--precision", default="fp32",
                   help="precision the device runs the models at: fp32, fp16 or int8, one the device declares "
                   "(each device converts the exported FP32 models itself; default fp32)")
    p.add_argument("--resolution", type=integer(8), help="input resolution (default: the space's)")
    p.add_argument("--num-classes", type=POSITIVE)
    p.add_argument("--checkpoint", help="supernet checkpoint (weights barely change latency; optional)")
    p.add_argument("--devices-file", help="devices YAML (default: $RAYNAS_DEVICES or cluster/devices.yaml)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(subparsers) -> None:
    profile = subparsers.add_parser("profile", help="latency on devices: lookup tables, calibration, validation")
    sub = profile.add_subparsers(dest="profile_command", required=True)

    p = sub.add_parser("devices", help="declared devices and which ones the Ray cluster has")
    p.add_argument("--devices-file")
    p.add_argument("--address")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("lut", help="measure every distinct block of a space on a device (per-block LUT)")
    _common(p, lut_required=False)
    p.add_argument("--out", required=True, help="LUT Parquet file (path or URI); existing rows of the same table are "
                   "reused, and measured blocks are stored as the build goes (a killed build resumes)")
    p.add_argument("--max-archs", type=POSITIVE, default=3000,
                   help="most subnets scanned for distinct blocks")
    p.add_argument("--patience", type=POSITIVE, default=300,
                   help="stop scanning after this many subnets in a row bring no new block")
    p.add_argument("--method", choices=LUT_METHODS, default="isolated",
                   help="isolated: each block timed in its own session; context: whole sampled subnets profiled "
                   "per node by onnxruntime, every node's time credited to its block (default isolated)")
    p.add_argument("--appearances", type=POSITIVE, default=2,
                   help="with --method context: the subnets each block is timed in (its entry: their median)")
    _passes(p, "block")
    p.add_argument("--force", action="store_true", help="measure every block again")
    p.set_defaults(func=cmd_lut)

    p = sub.add_parser("calibrate", help="fit kappa*sum(LUT)+epsilon (and the other models) on n measured subnets")
    _common(p, lut_required=True)
    p.add_argument("-n", type=POSITIVE, default=10, help="end-to-end measured subnets (default 10)")
    p.add_argument("--out", help="calibration JSON, path or URI (default: next to the LUT, <lut>.calibration.json)")
    _passes(p, "subnet")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("validate", help="accuracy of every latency model on n held-out measured subnets")
    _common(p, lut_required=True)
    p.add_argument("-n", type=POSITIVE, default=100, help="held-out subnets (default 100)")
    p.add_argument("--calibration", help="calibration JSON, path or URI (default: <lut>.calibration.json; "
                   "made if absent)")
    p.add_argument("--calibration-n", type=POSITIVE, default=10,
                   help="subnets measured to calibrate when no calibration exists yet (default 10)")
    p.add_argument("--save", help="write one row per held-out subnet (measured vs predicted) to this Parquet "
                   "(path or URI)")
    p.add_argument("--json", action="store_true", help="print the JSON summary only")
    p.add_argument("--no-recheck", dest="recheck", action="store_false",
                   help="measure the held-out subnets once only (default: once more, to report how far the "
                   "device agrees with itself)")
    _passes(p, "subnet")
    p.set_defaults(func=cmd_validate)


# ---- shared plumbing ---------------------------------------------------------------------------------
def _passes(parser, what: str) -> None:
    parser.add_argument("--passes", type=POSITIVE, default=1,
                        help=f"measure every {what} this many times in shuffled orders, keep the median pass "
                             "(steadier on a busy host)")


def _devices(args) -> list:
    from raynas.hw.devices import get_device

    names = list(dict.fromkeys(n.strip() for n in args.device.split(",") if n.strip()))
    if not names:
        raise UserError("--device: expected a device name, e.g. local-cpu")
    devices = [get_device(n, args.devices_file) for n in names]
    for d in devices:  # before any file is read or Ray started
        d.check_precision(args.precision, "--precision")
    return devices


def _supernet(args):
    from raynas.space import load_space
    from raynas.supernets import build_supernet

    if args.checkpoint:
        return _trained_supernet(args)
    space = load_space(args.space, resolution=args.resolution, num_classes=args.num_classes)
    if space.resolution < 8:
        raise UserError(f"--resolution: must be an integer >= 8, got {space.resolution}")
    return build_supernet(space).eval()


def _trained_supernet(args):
    """The checkpoint's supernet, as trained: it is profiled at its own space, classes and resolution."""
    from raynas.space import load_space
    from raynas.supernets.checkpoint import load_supernet

    supernet = load_supernet(args.checkpoint)
    space = supernet.space
    if space.name != load_space(args.space).name:
        raise UserError(f"--checkpoint: {args.checkpoint} was trained on space '{space.name}', not '{args.space}'")
    if args.resolution not in (None, space.resolution):
        raise UserError(f"--resolution: {args.resolution} differs from the checkpoint's {space.resolution}; "
                        "allowed: the checkpoint's resolution (or no --checkpoint: weights barely change latency)")
    return supernet


@contextmanager
def _ray(args):
    import ray

    from raynas.hw.devices import init_local_ray

    started = init_local_ray(address=args.address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


@contextmanager
def _profilers(devices):
    from raynas.hw.remote import start_profiler

    started = []
    try:
        for d in devices:
            started.append(start_profiler(d))
        yield started
    finally:
        for p in started:
            p.stop()


def _emit(objects: list[dict]) -> None:
    for obj in objects:
        print(json.dumps(obj))


def _group(lut: str, supernet, device, precision: str):
    from raynas.hw.lut import TableKey, load_group

    if not storage.is_file(lut):
        raise UserError(f"--lut: file {storage.display(lut)} does not exist; build it with "
                        f"`raynas profile lut --out {lut}`")
    return load_group(lut, TableKey.of(supernet, device, precision))


# ---- commands ----------------------------------------------------------------------------------------------
def cmd_devices(args) -> None:
    from raynas.hw.devices import LABEL_KEY, device_resource, devices_present, load_devices

    declared = load_devices(args.devices_file)
    with _ray(args):
        present = devices_present()
    rows = [{**spec.to_dict(), "present": name in present} for name, spec in declared.items()]
    rows += [{"name": n, "label": f"{LABEL_KEY}={n}", "resource": device_resource(n), "declared": False,
              "present": True} for n in present if n not in declared]
    if args.json:
        print(json.dumps(rows))
        return
    for r in rows:
        print(f"{r['name']:<20} runtime={r.get('runtime', '?'):<9} threads={r.get('threads', '?'):<3} "
              f"present={'yes' if r['present'] else 'no'}")


def cmd_lut(args) -> None:
    from raynas.hw.lut import build_lut, read_lut

    devices = _devices(args)
    supernet = _supernet(args)
    # Before any measurement: a foreign file at --out is refused, an unwritable location is reported.
    existing, existing_meta = read_lut(args.out, "--out")
    if args.force:
        existing, existing_meta = None, None
    storage.check_writable(storage.parent(args.out), "--out")
    with _ray(args), _profilers(devices) as profilers:
        rows, meta = build_lut(supernet, profilers, existing, existing_meta, seed=args.seed,
                               max_archs=args.max_archs, patience=args.patience, passes=args.passes,
                               show_progress=not args.quiet, out=args.out, method=args.method,
                               appearances=args.appearances, precision=args.precision)
        nodes = {p.device.name: p.node for p in profilers}
    out = []
    for info in meta.values():
        node = nodes[info["device"]]
        out.append({**{k: info[k] for k in ("space", "device", "runtime", "resolution", "num_classes", "precision",
                                             "blocks", "measured", "reused", "archs_scanned")},
                    "lut_build_s": info["build_s"], "out": str(args.out), "node_id": node["node_id"],
                    "hostname": node["hostname"]})
    _emit(out)


def cmd_calibrate(args) -> None:
    from raynas.hw.latency import calibration_path, load_calibration, save_calibration
    from raynas.hw.lut import TableKey
    from raynas.hw.profiling import calibrate_many

    devices = _devices(args)
    supernet = _supernet(args)
    tables = {d.name: _group(args.lut, supernet, d, args.precision)[0] for d in devices}
    out_path, what = (args.out, "--out") if args.out else (calibration_path(args.lut), "calibration")
    # Before measuring: a foreign file there would refuse the result; an unwritable location too.
    for d in devices:
        load_calibration(out_path, TableKey.of(supernet, d, args.precision), what)
    storage.check_writable(storage.parent(out_path), what)
    with _ray(args), _profilers(devices) as profilers:
        records = calibrate_many(supernet, tables, profilers, args.n, args.seed, show_progress=not args.quiet,
                                 passes=args.passes, precision=args.precision)
    out = []
    for d in devices:
        key, record = TableKey.of(supernet, d, args.precision), records[d.name]
        save_calibration(out_path, key, record, what)
        lut = record["models"]["lut"]["calibration"]
        out.append({"space": key.space, "device": key.device, "runtime": key.runtime, "resolution": key.resolution,
                    "num_classes": key.num_classes, "precision": key.precision, "n": record["n"], "kappa": lut["slope"],
                    "epsilon": lut["intercept"], "calibration": str(out_path),
                    "models": {k: {**v["calibration"], "fit": v["fit"]} for k, v in record["models"].items()},
                    "measured_ms": record["measured_ms"], "hostname": record["hostname"]})
    _emit(out)


def cmd_validate(args) -> None:
    from raynas.hw.latency import calibration_path, load_calibration, save_calibration
    from raynas.hw.lut import TableKey
    from raynas.hw.profiling import calibrate_many, validate_many

    devices = _devices(args)
    supernet = _supernet(args)
    groups = {d.name: _group(args.lut, supernet, d, args.precision) for d in devices}
    tables = {name: g[0] for name, g in groups.items()}
    build_s = {name: g[1].get("build_s") for name, g in groups.items()}
    calib_path, what = (args.calibration, "--calibration") if args.calibration else \
        (calibration_path(args.lut), "calibration")
    keys = {d.name: TableKey.of(supernet, d, args.precision) for d in devices}
    calibrations = {name: load_calibration(calib_path, key, what) for name, key in keys.items()}
    if args.save:
        storage.check_writable(storage.parent(args.save), "--save")
    with _ray(args), _profilers(devices) as profilers:
        missing = [p for p in profilers if calibrations[p.device.name] is None]
        if missing:
            print(f"raynas: no calibration in {storage.display(calib_path)} for {[p.device.name for p in missing]}; "
                  f"measuring {args.calibration_n} subnets to make one", file=sys.stderr)
            made = calibrate_many(supernet, tables, missing, args.calibration_n, args.seed,
                                  show_progress=not args.quiet, passes=args.passes, precision=args.precision)
            for name, record in made.items():
                save_calibration(calib_path, keys[name], record, what)
                calibrations[name] = record
        results = validate_many(supernet, tables, calibrations, profilers, args.n, args.seed, build_s,
                                show_progress=not args.quiet, passes=args.passes, recheck=args.recheck,
                                precision=args.precision)
    if args.save:
        import pandas as pd

        frames = [rows.assign(device=name, precision=args.precision) for name, (_, rows) in results.items()]
        storage.write_pandas(args.save, pd.concat(frames, ignore_index=True))
    summaries = [results[d.name][0] for d in devices]
    if args.json:
        _emit(summaries)
        return
    for s in summaries:
        print(f"{s['space']} on {s['device']} ({s['runtime']}, {s['precision']}), {s['n']} held-out subnets, "
              f"calibrated on {s['calibration_n']}, LUT build {s['lut_build_s']} s")
        for kind, m in s["models"].items():
            print(f"  {kind:<7} spearman={m['spearman']}  mape={m['mape']}%  within10={m['within10']}")
        for line in _measurement_lines(s):
            print(f"  {line}")


def _measurement_lines(summary: dict) -> list[str]:
    """What the figures above rest on: the reference speed, what drift-proofing changed, and how far the
    device agrees with itself (no model can be judged within +-10% more often than that)."""
    lines = []
    raw = summary.get("lut_without_reference")
    if summary.get("reference_ms") is not None:
        lines.append(f"latencies at the LUT's reference speed ({summary['reference_ms']:.4g} ms per reference call)"
                     + (f"; without it the lut model scores spearman={raw['spearman']} within10={raw['within10']}"
                        if raw else ""))
    if summary.get("self_agreement") is not None:
        agree = summary["self_agreement"]
        lines.append(f"self-agreement: {agree:.0%} of the subnets measured twice agree within +-10% "
                     f"({summary['self_agreement_raw']:.0%} without the reference)")
        if summary["within10"] is not None and summary["within10"] < 0.95 and agree < 0.95:
            lines.append("the device's own measurements disagree this often: a model's within10 cannot be "
                         "judged more finely than the self-agreement on this device")
    return lines
