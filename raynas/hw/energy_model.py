"""Energy model: predict a subnet's energy per inference (mJ above idle) on one device without running it.

raw = sum of the LUT's `energy_mj` over the subnet's blocks (raynas.hw.lut: each block's energy per call
above idle, the call's fixed cost taken off as latency's is), mapped to mJ by an affine calibration fitted,
like the latency models', on the calibration subnets' measured energy (`fit_energy`, stored as the
calibration record's `energy` by raynas.hw.profiling.fit_calibration). A calibration whose subnets were
measured without a meter has no `energy`: the model is then the blocks' sum itself (slope 1, intercept 0),
already in mJ. Search uses it through `predict(arch) -> mJ`:

    model = load_energy_model("runs/lut.parquet", supernet, device="jetson-nano", precision="int8")
    model.predict(arch)

Energy is not restated at a reference speed as latency is: a host slowed by a neighbour takes longer per
call, not more joules per inference.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from raynas import storage
from raynas.errors import UserError
from raynas.hw.latency import Affine, LutLatencyModel, calibration_path, load_calibration
from raynas.hw.lut import TableKey, load_group
from raynas.space import Arch
from raynas.supernets.base import Supernet

ENERGY_COLUMN = "energy_mj"


class LutEnergyModel(LutLatencyModel):
    """kappa_E * sum(LUT energy over the subnet's blocks) + epsilon_E, in mJ per inference above idle."""

    kind = "energy"

    def __init__(self, supernet: Supernet, table: pd.DataFrame, calibration: Affine | None = None):
        super().__init__(supernet, table, calibration, column=ENERGY_COLUMN)


def has_energy(table: pd.DataFrame) -> bool:
    """Whether a LUT group holds measured energy (its device declared a meter when it was built)."""
    return bool(len(table)) and bool(pd.to_numeric(table[ENERGY_COLUMN], errors="coerce").notna().any())


def measured_energy(records: Sequence[dict]) -> list[float] | None:
    """The records' energy per inference (mJ), None unless every one was measured with a meter."""
    energy = [r.get(ENERGY_COLUMN) for r in records]
    return None if not energy or any(e is None for e in energy) else [float(e) for e in energy]


def fit_energy(supernet: Supernet, table: pd.DataFrame, archs: Sequence[Arch],
               measured_mj: Sequence[float]) -> LutEnergyModel:
    """The energy model of a LUT group, calibrated on subnets `archs` whose measured energy is `measured_mj`."""
    model = LutEnergyModel(supernet, table)
    model.calibrate(archs, measured_mj)
    return model


def load_energy_model(lut: str | os.PathLike, supernet: Supernet, device: str = "local-cpu",
                      devices_file: str | Path | None = None, precision: str = "fp32",
                      calibration: str | os.PathLike | None = None, what: str = "--lut") -> LutEnergyModel:
    """The energy model of `device` at `precision` from the LUT at `lut` and its calibration (beside it,
    unless `calibration` names another file). One line when the device has no meter (it names the meters
    raynas knows) and when the LUT group holds no energy (built before the device declared its meter)."""
    from raynas.hw.devices import get_device
    from raynas.hw.energy import require_energy

    spec = get_device(device, devices_file)
    require_energy(spec)
    spec.check_precision(precision, "precision")
    key = TableKey.of(supernet, spec, precision)
    table, _ = load_group(lut, key, what)
    if not has_energy(table):
        at = "" if precision == "fp32" else f" --precision {precision}"
        raise UserError(f"{what}: {storage.display(lut)} holds no energy for {key.id} (its blocks were measured "
                        f"while device '{device}' declared no meter); allowed: the group measured again with the "
                        f"meter, `raynas profile lut --space {key.space} --device {device} --out {lut}{at}`")
    record = load_calibration(calibration or calibration_path(lut), key) or {}
    fitted = record.get("energy")
    return LutEnergyModel(supernet, table, Affine(**fitted["calibration"]) if fitted else None)
