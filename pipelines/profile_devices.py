"""Profile search spaces on every device present in the Ray cluster, for `ray job submit`:

    ray job submit --working-dir . -- python pipelines/profile_devices.py \
        --spaces scanedge,autovit-xxs --out runs/profile [--precisions fp32,int8]

For each space and each precision (default fp32; a device is skipped at a precision it does not run): a
per-block latency LUT on every device (in parallel, one profiler actor per device
node), calibrated on 10 measured subnets per device, optionally validated on held-out subnets. Devices are
the nodes labelled `device=<name>` (or advertising the older resource `device:<name>`) that
cluster/devices.yaml declares. `--out` is a directory or a URI prefix (s3://bucket/profile); a re-run
with the same `--out` reuses the blocks and calibrations stored there. Outside a cluster (no RAY_ADDRESS)
a local Ray labelled `device=local-cpu` is started. Thin on purpose: the work is in raynas.hw.profile_all.
"""

from __future__ import annotations

import argparse
import json
import sys

from raynas.errors import UserError
from raynas.hw.devices import LUT_METHODS
from raynas.hw.precision import check_precision


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spaces", required=True, help="comma-separated built-in space names or YAML paths")
    parser.add_argument("--out", required=True,
                        help="directory or URI prefix (s3://bucket/profile) for LUTs, calibrations and the summary")
    parser.add_argument("--devices", help="comma-separated device names (default: every device present)")
    parser.add_argument("--devices-file", help="devices YAML (default: cluster/devices.yaml)")
    parser.add_argument("--resolution", type=int, help="input resolution (default: each space's)")
    parser.add_argument("--calibration-n", type=int, default=10)
    parser.add_argument("--validate-n", type=int, default=0, help="held-out subnets to validate on (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patience", type=int, default=300)
    parser.add_argument("--method", choices=LUT_METHODS, default="isolated",
                        help="how LUT blocks are timed (see `raynas profile lut --method`)")
    parser.add_argument("--passes", type=int, default=1, help="LUT measurement passes (median kept)")
    parser.add_argument("--precisions", default="fp32",
                        help="comma-separated precisions to profile at, e.g. fp32,int8 (default fp32)")
    parser.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    args = parser.parse_args(argv)

    import ray

    from raynas.hw.devices import init_local_ray
    from raynas.hw.profile_all import devices_to_profile, profile_devices

    started = False
    try:
        if args.calibration_n < 1 or args.validate_n < 0 or args.passes < 1:
            raise UserError("--calibration-n and --passes: expected >= 1; --validate-n: expected >= 0")
        spaces = [s.strip() for s in args.spaces.split(",") if s.strip()]
        if not spaces:
            raise UserError("--spaces: expected at least one space name")
        precisions = [check_precision(p.strip(), "--precisions") for p in args.precisions.split(",") if p.strip()]
        started = init_local_ray(address=args.address)
        only = [d.strip() for d in args.devices.split(",")] if args.devices else None
        devices, skipped = devices_to_profile(args.devices_file, only)
        for line in skipped:
            print(f"[profile] skipped {line}", file=sys.stderr)
        summary = profile_devices(spaces, args.out, devices, resolution=args.resolution,
                                  calibration_n=args.calibration_n, validate_n=args.validate_n, seed=args.seed,
                                  patience=args.patience, passes=args.passes, method=args.method,
                                  precisions=precisions)
        summary["skipped"] = skipped
    except UserError as exc:
        print(f"profile_devices: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if started:  # a caller's Ray connection (this ran in-process) is left alone
            ray.shutdown()
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
