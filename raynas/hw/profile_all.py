"""Profile spaces on every device present in the Ray cluster: LUT, calibration and (optionally) validation.

What `pipelines/profile_devices.py` runs under `ray job submit`. Devices are measured in parallel (one
profiler actor per device node), at each of `precisions` that they run (a device is skipped at a precision
it does not declare); the files land in `out_dir`, a local directory or a URI prefix (s3://bucket/profile),
written through raynas.storage (a re-run resumes from what is stored there):

  <space>.lut.parquet              the per-block LUTs of every device (one group per device and precision)
  <space>.lut.calibration.json     kappa/epsilon of every model, per device and precision
  <space>.validation.parquet       held-out subnets, measured vs predicted (when validate_n > 0)
  profile_summary.json             what was done, per space, device and precision:
                                   summary["spaces"][space][device][precision]
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from raynas import storage
from raynas.errors import UserError
from raynas.hw.devices import LABEL_KEY, DeviceSpec, device_resource, devices_present, load_devices
from raynas.hw.latency import calibration_path, load_calibration, save_calibration
from raynas.hw.lut import TableKey, build_lut, read_lut, select
from raynas.hw.profiling import calibrate_many, validate_many
from raynas.hw.remote import Profiler, start_profiler


def devices_to_profile(devices_file: str | Path | None = None, only: Sequence[str] | None = None
                       ) -> tuple[list[DeviceSpec], list[str]]:
    """Declared devices that some node is (by label or resource; all of them, or `only`), and the names
    skipped and why."""
    declared = load_devices(devices_file)
    present = devices_present()
    wanted = list(dict.fromkeys(only)) if only else sorted(present)
    chosen, skipped = [], []
    for name in wanted:
        if name not in present:
            skipped.append(f"{name}: no node is labelled {LABEL_KEY}={name} or advertises {device_resource(name)}")
        elif name not in declared:
            skipped.append(f"{name}: present but not declared in the devices file (runtime/threads unknown)")
        else:
            chosen.append(declared[name])
    if not chosen:
        raise UserError(f"devices: nothing to profile; present: {sorted(present) or 'none'}, "
                        f"declared: {sorted(declared)}; skipped: {skipped}")
    return chosen, skipped


def precisions_to_profile(devices: Sequence[DeviceSpec], precisions: Sequence[str]
                          ) -> tuple[dict[str, list[str]], list[str]]:
    """Per precision, the devices that run it; and the (device, precision) pairs skipped and why. A precision
    no device runs is refused (one line naming the first device and what it runs)."""
    wanted = list(dict.fromkeys(precisions))
    if not wanted:
        raise UserError("--precisions: expected at least one precision, e.g. fp32 or fp32,int8")
    chosen: dict[str, list[str]] = {}
    skipped: list[str] = []
    for precision in wanted:
        running = [d.name for d in devices if precision in d.runs_precisions]
        if not running:
            devices[0].check_precision(precision, "--precisions")
        chosen[precision] = running
        skipped += [f"{d.name}: does not run {precision} (it runs {list(d.runs_precisions)})"
                    for d in devices if d.name not in running]
    return chosen, skipped


def profile_devices(spaces: Sequence[str], out_dir: str | os.PathLike, devices: Sequence[DeviceSpec],
                    resolution: int | None = None, calibration_n: int = 10, validate_n: int = 0,
                    seed: int = 0, patience: int = 300, max_archs: int = 3000, passes: int = 1,
                    show_progress: bool = True, method: str = "isolated",
                    precisions: Sequence[str] = ("fp32",)) -> dict[str, Any]:
    from raynas.space import load_space
    from raynas.supernets import build_supernet

    out_dir = storage.check_writable(out_dir, "--out")
    by_precision, skipped = precisions_to_profile(devices, precisions)
    for line in skipped:
        print(f"[profile] skipped {line}", file=sys.stderr)
    summary: dict[str, Any] = {"devices": [d.name for d in devices], "precisions": list(by_precision),
                               "skipped_precisions": skipped, "spaces": {}}
    profilers = [start_profiler(d) for d in devices]
    try:
        summary["nodes"] = {p.device.name: p.node for p in profilers}
        for name in spaces:
            supernet = build_supernet(load_space(name, resolution=resolution)).eval()
            per_device: dict[str, dict[str, dict]] = {d.name: {} for d in devices}
            frames = []
            for precision, names in by_precision.items():
                running = [p for p in profilers if p.device.name in names]
                results, rows = _profile_space(supernet, running, out_dir, precision, calibration_n, validate_n,
                                               seed, patience, max_archs, passes, show_progress, method)
                for n, entry in results.items():
                    per_device[n][precision] = entry
                frames += rows
            if frames:
                import pandas as pd

                storage.write_pandas(storage.join(out_dir, f"{supernet.space.name}.validation.parquet"),
                                     pd.concat(frames, ignore_index=True))
            summary["spaces"][supernet.space.name] = per_device
    finally:
        for p in profilers:
            p.stop()
    storage.write_text(storage.join(out_dir, "profile_summary.json"), json.dumps(summary, indent=1, default=str))
    return summary


def _profile_space(supernet, profilers: list[Profiler], out_dir: str, precision: str, calibration_n: int,
                   validate_n: int, seed: int, patience: int, max_archs: int, passes: int, show_progress: bool,
                   method: str) -> tuple[dict[str, dict], list]:
    """One space at one precision on `profilers`: LUT, calibration, optional validation. Returns the summary
    entry per device and the validation rows (one frame per device, with its device and precision)."""
    lut_path = storage.join(out_dir, f"{supernet.space.name}.lut.parquet")
    calib_path = calibration_path(lut_path)
    print(f"[profile] {supernet.space.name}: LUT at {precision} on {[p.device.name for p in profilers]}",
          file=sys.stderr)
    existing, existing_meta = read_lut(lut_path, "--out")
    rows, meta = build_lut(supernet, profilers, existing, existing_meta, seed=seed, max_archs=max_archs,
                           patience=patience, passes=passes, show_progress=show_progress, out=lut_path,
                           method=method, precision=precision)
    keys = {p.device.name: TableKey.of(supernet, p.device, precision) for p in profilers}
    tables = {n: select(rows, k) for n, k in keys.items()}
    # A stored calibration is kept when it used enough subnets and its table has not changed since.
    stored = {n: load_calibration(calib_path, k, "--out") for n, k in keys.items()}
    calibrations = {n: r for n, r in stored.items()
                    if r is not None and r.get("n", 0) >= calibration_n and meta[keys[n].id]["measured"] == 0}
    todo = [p for p in profilers if p.device.name not in calibrations]
    made = calibrate_many(supernet, tables, todo, calibration_n, seed, show_progress,
                          precision=precision) if todo else {}
    for n, record in made.items():
        save_calibration(calib_path, keys[n], record, "--out")
    calibrations.update(made)
    per_device = {n: {"lut": lut_path, "calibration": calib_path,
                      "blocks": meta[k.id]["blocks"], "measured": meta[k.id]["measured"],
                      "lut_build_s": meta[k.id]["build_s"], "calibration_n": calibrations[n]["n"],
                      "kappa": calibrations[n]["models"]["lut"]["calibration"]["slope"],
                      "epsilon": calibrations[n]["models"]["lut"]["calibration"]["intercept"]}
                  for n, k in keys.items()}
    frames = []
    if validate_n > 0:
        build_s = {n: meta[k.id]["build_s"] for n, k in keys.items()}
        results = validate_many(supernet, tables, calibrations, profilers, validate_n, seed, build_s,
                                show_progress, precision=precision)
        for n, (s, per_arch) in results.items():
            per_device[n]["validation"] = s
            frames.append(per_arch.assign(device=n, precision=precision))
    return per_device, frames
