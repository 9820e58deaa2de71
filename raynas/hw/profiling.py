"""End-to-end subnet measurement on a device, model calibration (<= 10 subnets) and held-out validation, at
the precision the device runs the model at (each device converts the exported FP32 subnets itself)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from raynas.hw.devices import DeviceSpec
from raynas.hw.energy_model import LutEnergyModel, fit_energy, has_energy, measured_energy
from raynas.hw.latency import Affine, BlockLinearModel, CalibratedModel, build_models
from raynas.hw.lut import lut_baseline_ms, measure_on_devices, subnet_onnx
from raynas.hw.measure import at_reference_speed
from raynas.hw.remote import Profiler
from raynas.space import Arch, SearchSpace
from raynas.supernets.base import Supernet


def measure_subnets(supernet: Supernet, archs: Sequence[Arch], profilers: list[Profiler],
                    show_progress: bool = True, desc: str = "subnets", passes: int = 1,
                    precision: str = "fp32") -> dict[str, list[dict]]:
    """Export each subnet to ONNX and time it end to end on every device at `precision` (each record carries
    it, and the converted model's `size_mb`); records in `archs` order.
    `passes` > 1: each pass in a new order, the median pass kept per subnet (see `measure_on_devices`)."""
    def maker(arch: Arch):
        return lambda: subnet_onnx(supernet, arch)

    items = [(arch.to_json(), maker(arch)) for arch in archs]
    return measure_on_devices(profilers, items, chunk=4, desc=desc, show_progress=show_progress, passes=passes,
                              precision=precision)


def calibration_archs(space: SearchSpace, n: int, seed: int) -> list[Arch]:
    """The smallest and largest subnet (so the fit spans the whole latency range) and random ones."""
    rng = np.random.default_rng([seed, 1])
    archs: list[Arch] = []
    for arch in (space.min_arch(), space.max_arch()):
        if len(archs) < n and arch not in archs:
            archs.append(arch)
    return _fill_random(space, archs, n, rng, exclude=set())


def held_out_archs(space: SearchSpace, n: int, seed: int, exclude: Sequence[Arch]) -> list[Arch]:
    return _fill_random(space, [], n, np.random.default_rng([seed, 2]), exclude=set(exclude))


def _fill_random(space, archs: list[Arch], n: int, rng, exclude: set) -> list[Arch]:
    seen = set(archs) | exclude
    attempts = 0
    while len(archs) < n and attempts < 100 * n:
        arch = space.sample(rng)
        attempts += 1
        if arch not in seen:
            seen.add(arch)
            archs.append(arch)
    return archs


def at_lut_speed(records: Sequence[dict], baseline_ms: float | None) -> list[float]:
    """Measured latencies (ms) stated at the LUT's reference speed (see raynas.hw.measure.ReferenceClock)."""
    return [at_reference_speed(r["median_ms"], r.get("reference_ms"), baseline_ms) for r in records]


def fit_calibration(supernet: Supernet, table: pd.DataFrame, archs: Sequence[Arch], records: list[dict],
                    seed: int = 0) -> dict[str, Any]:
    """Each model's kappa/epsilon fitted on measured subnets; the record `latency.save_calibration` stores.

    Fitted at the LUT's reference speed (`baseline_ms`): the subnets are measured minutes or days after the
    blocks, on a device whose speed may have moved meanwhile. `measured_raw_ms` keeps what the clock showed.
    Subnets measured with an energy meter keep their `measured_energy_mj` (and `idle_w`); on a LUT that holds
    energy they also calibrate the energy model (raynas.hw.energy_model): the record's `energy`.
    """
    baseline = lut_baseline_ms(table)
    measured = at_lut_speed(records, baseline)
    models = build_models(supernet, table)
    fitted = {kind: model.calibrate(archs, measured) for kind, model in models.items()}
    summary = {kind: {"calibration": {"slope": f.slope, "intercept": f.intercept},
                      "fit": accuracy([models[kind].predict(a) for a in archs], measured)}
               for kind, f in fitted.items()}
    summary["linear"]["block_model"] = models["linear"].block_model.to_dict()
    summary["lut"]["missing_keys"] = len(models["lut"].missing_keys)
    energy = measured_energy(records)
    energy_fields = {} if energy is None else {"measured_energy_mj": energy, "idle_w": [r["idle_w"] for r in records]}
    if energy is not None and has_energy(table):
        model = fit_energy(supernet, table, archs, energy)
        energy_fields["energy"] = {
            "calibration": {"slope": model.calibration.slope, "intercept": model.calibration.intercept},
            "fit": accuracy([model.predict(a) for a in archs], energy), "missing_keys": len(model.missing_keys)}
    return {
        "n": len(archs), "seed": seed, "precision": records[0].get("precision", "fp32") if records else None,
        "archs": [a.to_dict() for a in archs], "measured_ms": measured,
        "measured_raw_ms": [r["median_ms"] for r in records], "reference_ms": [r.get("reference_ms") for r in records],
        "baseline_ms": baseline, "iqr_ms": [r["iqr_ms"] for r in records],
        "node_id": records[0]["node_id"] if records else None,
        "hostname": records[0]["hostname"] if records else None, "models": summary, **energy_fields,
    }


def calibrate_many(supernet: Supernet, tables: dict[str, pd.DataFrame], profilers: list[Profiler], n: int = 10,
                   seed: int = 0, show_progress: bool = True, passes: int = 1,
                   precision: str = "fp32") -> dict[str, dict[str, Any]]:
    """Measure the same `n` subnets end to end on every device at once and calibrate each device's models
    (seed 004 §3: ~10 subnets). `tables` maps device name -> its LUT group, measured at `precision`, the
    precision the subnets are measured at."""
    archs = calibration_archs(supernet.space, n, seed)
    records = measure_subnets(supernet, archs, profilers, show_progress, desc="calibration subnets", passes=passes,
                              precision=precision)
    return {p.device.name: fit_calibration(supernet, tables[p.device.name], archs, records[p.device.name], seed)
            for p in profilers}


def calibrate(supernet: Supernet, table: pd.DataFrame, profiler: Profiler, n: int = 10, seed: int = 0,
              show_progress: bool = True, passes: int = 1, precision: str = "fp32") -> dict[str, Any]:
    """`calibrate_many` for one device."""
    return calibrate_many(supernet, {profiler.device.name: table}, [profiler], n, seed, show_progress, passes,
                          precision)[profiler.device.name]


def models_from_calibration(supernet: Supernet, table: pd.DataFrame, record: dict) -> dict[str, CalibratedModel]:
    models = build_models(supernet, table)
    for kind, model in models.items():
        model.calibration = Affine(**record["models"][kind]["calibration"])
    block_model = record["models"]["linear"].get("block_model")
    if block_model:
        models["linear"].block_model = BlockLinearModel(**block_model)
    return models


def accuracy(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
    """Spearman rank correlation, mean absolute percentage error (%), share within +-10% (0..1)."""
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    rel = np.abs(p - m) / m
    rho = spearmanr(p, m).statistic if len(p) > 1 and np.ptp(p) > 0 and np.ptp(m) > 0 else float("nan")
    return {"spearman": _num(rho), "mape": _num(100 * rel.mean()), "within10": _num((rel <= 0.10).mean())}


def _num(x: float, digits: int = 4) -> float | None:
    x = float(x)
    return None if math.isnan(x) else round(x, digits)


def summarize_validation(supernet: Supernet, table: pd.DataFrame, calibration: dict, device: DeviceSpec,
                         archs: Sequence[Arch], records: list[dict], seed: int = 0,
                         lut_build_s: float | None = None, again: list[dict] | None = None,
                         precision: str = "fp32") -> tuple[dict[str, Any], pd.DataFrame]:
    """Each calibrated model's predictions against the measured held-out subnets, at the LUT's reference
    speed. `again`: the same subnets measured once more, for the measurement's self-agreement. `precision`:
    the one the table, the calibration and the subnets were measured at."""
    baseline = calibration.get("baseline_ms") or lut_baseline_ms(table)
    measured = at_lut_speed(records, baseline)
    models = models_from_calibration(supernet, table, calibration)
    rows = pd.DataFrame({"arch": [a.to_json() for a in archs], "measured_ms": measured,
                         "measured_raw_ms": [r["median_ms"] for r in records],
                         "reference_ms": [r.get("reference_ms") for r in records],
                         "iqr_ms": [r["iqr_ms"] for r in records]})
    energy = measured_energy(records)
    if energy is not None:
        rows["measured_energy_mj"] = energy
    per_model = {}
    for kind, model in models.items():
        rows[f"{kind}_ms"] = [model.predict(a) for a in archs]
        per_model[kind] = {**accuracy(rows[f"{kind}_ms"], measured),
                           "kappa": float(f"{model.calibration.slope:.6g}"),
                           "epsilon": float(f"{model.calibration.intercept:.6g}")}
    lut = per_model["lut"]
    summary = {
        "n": len(archs), "spearman": lut["spearman"], "mape": lut["mape"], "within10": lut["within10"],
        "flops_spearman": per_model["flops"]["spearman"], "params_spearman": per_model["params"]["spearman"],
        "calibration_n": calibration["n"],
        "lut_build_s": None if lut_build_s is None else round(float(lut_build_s), 2),
        "space": supernet.space.name, "device": device.name, "runtime": device.runtime,
        "resolution": supernet.space.resolution, "num_classes": supernet.space.num_classes,
        "precision": precision, "seed": seed, "lut_blocks": len(table), "missing_keys": len(models["lut"].missing_keys),
        "reference_ms": baseline,
        "measured_ms": {"min": _num(min(measured)), "median": _num(float(np.median(measured))),
                        "max": _num(max(measured))} if measured else None,
        "models": per_model, "hostname": records[0]["hostname"] if records else None,
    }
    if energy is not None and "energy" in calibration and has_energy(table):
        model = LutEnergyModel(supernet, table, Affine(**calibration["energy"]["calibration"]))
        rows["energy_mj"] = [model.predict(a) for a in archs]
        summary["energy"] = {**accuracy(rows["energy_mj"], energy),
                             "measured_mj": {"min": _num(min(energy)), "median": _num(float(np.median(energy))),
                                             "max": _num(max(energy))}}
    if baseline is not None and "measured_raw_ms" in calibration:
        summary["lut_without_reference"] = _raw_lut_accuracy(supernet, table, calibration, archs, records)
    if again is not None:
        rows["measured_again_ms"] = at_lut_speed(again, baseline)
        summary["self_agreement"] = _num(agreement(rows["measured_ms"], rows["measured_again_ms"]))
        summary["self_agreement_raw"] = _num(agreement([r["median_ms"] for r in records],
                                                       [r["median_ms"] for r in again]))
    return summary, rows


def agreement(first: Sequence[float], second: Sequence[float], within: float = 0.10) -> float:
    """Share of models whose two measurements agree within +-`within` (relative to the first)."""
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    return float((np.abs(b - a) <= within * a).mean()) if len(a) else float("nan")


def _raw_lut_accuracy(supernet: Supernet, table: pd.DataFrame, calibration: dict, archs: Sequence[Arch],
                      records: list[dict]) -> dict[str, float]:
    """What the LUT model scores when nothing is stated at the reference speed (raw blocks, raw calibration
    subnets, raw held-out subnets): the figure drift-proofing is there to improve on."""
    model = build_models(supernet, table.assign(latency_ms=table["latency_raw_ms"]))["lut"]
    model.calibrate([supernet.space.validate(a) for a in calibration["archs"]], calibration["measured_raw_ms"])
    return accuracy([model.predict(a) for a in archs], [r["median_ms"] for r in records])


def validate_many(supernet: Supernet, tables: dict[str, pd.DataFrame], calibrations: dict[str, dict],
                  profilers: list[Profiler], n: int = 100, seed: int = 0,
                  lut_build_s: dict[str, float] | None = None, show_progress: bool = True, passes: int = 1,
                  recheck: bool = True, precision: str = "fp32") -> dict[str, tuple[dict[str, Any], pd.DataFrame]]:
    """Measure `n` random subnets that no device's calibration used, on every device at once at `precision`
    (that of `tables` and `calibrations`), and compare each model's prediction with them. `recheck`: measure
    them once more, in reverse order, to report how far the device agrees with itself (no model can be
    judged closer than that). Returns per device: (summary, one row per subnet)."""
    used = {supernet.space.validate(a) for c in calibrations.values() for a in c["archs"]}
    archs = held_out_archs(supernet.space, n, seed, exclude=list(used))
    common = dict(show_progress=show_progress, passes=passes, precision=precision)
    records = measure_subnets(supernet, archs, profilers, desc="held-out subnets", **common)
    again = None
    if recheck:
        backwards = measure_subnets(supernet, archs[::-1], profilers, desc="held-out again", **common)
        again = {name: recs[::-1] for name, recs in backwards.items()}
    return {p.device.name: summarize_validation(
        supernet, tables[p.device.name], calibrations[p.device.name], p.device, archs, records[p.device.name],
        seed, (lut_build_s or {}).get(p.device.name), None if again is None else again[p.device.name], precision)
        for p in profilers}


def validate(supernet: Supernet, table: pd.DataFrame, calibration: dict, profiler: Profiler, n: int = 100,
             seed: int = 0, lut_build_s: float | None = None, show_progress: bool = True, passes: int = 1,
             recheck: bool = True, precision: str = "fp32") -> tuple[dict[str, Any], pd.DataFrame]:
    """`validate_many` for one device: (the `raynas profile validate --json` object, rows per subnet)."""
    name = profiler.device.name
    return validate_many(supernet, {name: table}, {name: calibration}, [profiler], n, seed,
                         {name: lut_build_s} if lut_build_s is not None else None, show_progress, passes,
                         recheck, precision)[name]
