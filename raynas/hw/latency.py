"""Latency models: predict a subnet's latency (ms) on one device without running it.

Every model computes a raw score of the arch and maps it to milliseconds with an affine calibration
fitted on a few measured end-to-end subnets (seed 004 §3: latency ~ kappa * raw + epsilon):

  * `lut`    raw = sum of the per-block lookup table over the subnet's blocks (seed 004).
  * `linear` raw = sum over blocks of seed 001's eq. 6, L(m) = sum_i l_i o_i(m) + sum_j t_j d_j(m),
             with non-negative coefficients fitted on the measured blocks of the LUT.
  * `flops`  raw = MACs (from `supernet.cost`), a hardware-agnostic proxy.
  * `params` raw = parameter count, the other proxy.

Search uses them through `LatencyModel.predict(arch) -> ms`; build one with `load_latency_model`:

    model = load_latency_model("lut", lut="runs/lut.parquet", space="scanedge", device="local-cpu")
    model.predict(arch)
    int8 = load_latency_model("lut", lut="runs/lut.parquet", space="scanedge", precision="int8")

The calibration (kappa, epsilon per model and the measured subnets) lives in a small JSON file next
to the LUT (`calibration_path(lut)`), keyed like the table by space|device|runtime|resolution|num_classes|
precision (a file written before precisions existed keys its groups without the precision: they are the
fp32 ones). Both are read and written through raynas.storage: a local path or a URI (s3://...) alike.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
from scipy.optimize import nnls

from raynas import storage
from raynas.errors import UserError
from raynas.hw.features import FEATURES, block_features
from raynas.hw.lut import TableKey, load_group, lut_baseline_ms
from raynas.hw.measure import at_reference_speed
from raynas.space import Arch
from raynas.supernets.base import Block, Supernet

MODEL_KINDS = ("lut", "linear", "flops", "params")


@runtime_checkable
class LatencyModel(Protocol):
    """What search sees: milliseconds on one device for an arch of the space."""

    kind: str

    def predict(self, arch: Mapping[str, Any]) -> float: ...


@dataclass
class Affine:
    """y = slope * x + intercept (kappa and epsilon of seed 004)."""

    slope: float = 1.0
    intercept: float = 0.0

    def __call__(self, x: float) -> float:
        return self.slope * x + self.intercept

    @classmethod
    def fit(cls, x: Sequence[float], y: Sequence[float]) -> Affine:
        """Least squares on relative errors, with epsilon >= 0.

        Relative errors because the target is "within +-10%" for subnets from a few hundred microseconds
        to tens of milliseconds: plain least squares lets the largest subnets decide the line and can
        give a negative epsilon, i.e. negative latencies for the smallest. Epsilon is a fixed cost per
        model call, so it is never negative: a fit that wants one becomes the ratio through the origin.
        With one point or no spread in x, the ratio through the origin.
        """
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if len(x) == 0:
            raise ValueError("calibration needs at least one measured subnet")
        weight = 1.0 / np.maximum(np.abs(y), 1e-12)  # residual / y: relative error
        if len(x) >= 2 and np.ptp(x) > 1e-12 * max(abs(x).max(), 1e-30):
            design = np.stack([x, np.ones_like(x)], axis=1) * weight[:, None]
            (slope, intercept), *_ = np.linalg.lstsq(design, y * weight, rcond=None)
            if intercept >= 0 and slope > 0:
                return cls(float(slope), float(intercept))
        through_origin = float(np.sum(x * y * weight**2) / np.sum((x * weight) ** 2)) if np.any(x) else 1.0
        return cls(through_origin, 0.0)


class BlockLinearModel:
    """Seed 001 eq. 6 for one block: non-negative weights over operator costs and design parameters.

    Non-negative least squares keeps every operator's cost >= 0, which keeps the fit sane on the few
    hundred blocks a LUT has. Features are scaled by their largest value before fitting.
    """

    def __init__(self, coef: Mapping[str, float], intercept: float):
        self.coef = {name: float(coef.get(name, 0.0)) for name in FEATURES}
        self.intercept = float(intercept)

    def __call__(self, features: Mapping[str, float]) -> float:
        return self.intercept + sum(w * features[name] for name, w in self.coef.items() if w)

    @classmethod
    def fit(cls, features: pd.DataFrame, latency_ms: Sequence[float]) -> BlockLinearModel:
        x = features[list(FEATURES)].to_numpy(dtype=float)
        scale = np.abs(x).max(axis=0)
        scale[scale == 0] = 1.0
        design = np.hstack([x / scale, np.ones((len(x), 1))])
        w, _ = nnls(design, np.asarray(latency_ms, dtype=float), maxiter=50 * design.shape[1])
        return cls(dict(zip(FEATURES, w[:-1] / scale)), w[-1])

    def to_dict(self) -> dict:
        return {"coef": self.coef, "intercept": self.intercept}

    @classmethod
    def from_table(cls, table: pd.DataFrame, column: str = "latency_ms") -> BlockLinearModel:
        """Fitted on the table's blocks' `column` (latency; raynas.hw.energy_model fits energy)."""
        feats = table[[f"f_{n}" for n in FEATURES]].rename(columns=lambda c: c[2:])
        return cls.fit(feats, table[column])


def table_features(table: pd.DataFrame) -> dict[str, dict[str, float]]:
    cols = [f"f_{n}" for n in FEATURES]
    return {k: dict(zip(FEATURES, map(float, row))) for k, row in zip(table["key"], table[cols].to_numpy())}


class BlockIndex:
    """Block keys of archs, cached, and the features of keys the table lacks.

    `blocks()` builds static modules with copied weights, which is slow for a search that predicts
    thousands of archs: each arch's keys are computed once, and features only for keys not yet known.
    """

    def __init__(self, supernet: Supernet, known_features: dict[str, dict[str, float]], cache_size: int = 50_000):
        self.supernet = supernet
        self.features = dict(known_features)
        self._keys: OrderedDict[Arch, list[str]] = OrderedDict()
        self._cache_size = cache_size

    def key_of(self, block: Block) -> str:
        """The block's key, its features computed when not yet known."""
        if block.key not in self.features:
            self.features[block.key] = block_features(block.module, block.in_shape)
        return block.key

    def _compute(self, arch: Arch) -> list[str]:
        return [self.key_of(block) for block in self.supernet.blocks(arch)]

    def keys(self, arch: Mapping[str, Any]) -> list[str]:
        arch = arch if isinstance(arch, Arch) else self.supernet.space.validate(arch)
        if arch in self._keys:
            self._keys.move_to_end(arch)
            return self._keys[arch]
        keys = self._compute(arch)
        self._keys[arch] = keys
        if len(self._keys) > self._cache_size:
            self._keys.popitem(last=False)
        return keys


class CalibratedModel:
    """raw(arch) -> ms through an affine calibration; subclasses define `raw`.

    `predict` gives milliseconds at the LUT's reference speed `baseline_ms` (the time of one call of
    raynas.hw.measure's reference model when the LUT was measured; None when measured without one), and
    `predict_at` at the speed the device has when its reference call takes `reference_ms`.
    """

    kind = "raw"

    def __init__(self, calibration: Affine | None = None, baseline_ms: float | None = None):
        self.calibration = calibration or Affine()
        self.baseline_ms = baseline_ms

    def raw(self, arch: Mapping[str, Any]) -> float:  # pragma: no cover
        raise NotImplementedError

    def piece_raw(self, blocks: Sequence[Block], cost: Mapping[str, float]) -> float:  # pragma: no cover
        """The raw score, on the scale of `raw`, of a piece of a network: its `blocks` and their summed
        `cost` (macs, params). Prices the pieces of a routed big/little pair (raynas.biglittle.costs)."""
        raise NotImplementedError

    def predict(self, arch: Mapping[str, Any]) -> float:
        return float(self.calibration(self.raw(arch)))

    def predict_at(self, arch: Mapping[str, Any], reference_ms: float | None) -> float:
        """The prediction at the device's current speed (the reverse of stating it at the reference speed)."""
        predicted = self.predict(arch)
        return at_reference_speed(predicted, self.baseline_ms, reference_ms)

    def calibrate(self, archs: Sequence[Mapping[str, Any]], measured_ms: Sequence[float]) -> Affine:
        self.calibration = Affine.fit([self.raw(a) for a in archs], measured_ms)
        return self.calibration


class LutLatencyModel(CalibratedModel):
    """kappa * sum(LUT over the subnet's blocks) + epsilon.

    A block configuration the table lacks (a rare one the build's sampling never met), or whose `column` is
    NaN (not measured), is estimated by the block linear model fitted on the table's measured blocks, and
    counted in `missing_keys`, rather than failing a search. `column`: the per-block figure summed
    (`latency_ms`; the energy model sums `energy_mj`).
    """

    kind = "lut"

    def __init__(self, supernet: Supernet, table: pd.DataFrame, calibration: Affine | None = None,
                 column: str = "latency_ms"):
        super().__init__(calibration)
        values = pd.to_numeric(table[column], errors="coerce").astype(float)
        measured = table[values.notna().to_numpy()]
        self.column = column
        self.table = dict(zip(measured["key"], values[values.notna()]))
        self.index = BlockIndex(supernet, table_features(table))
        self._fallback: BlockLinearModel | None = None
        self._table_frame = measured
        self.missing_keys: set[str] = set()

    def _block_raw(self, key: str) -> float:
        if key in self.table:
            return self.table[key]
        if self._fallback is None:
            self._fallback = BlockLinearModel.from_table(self._table_frame, self.column)
        self.missing_keys.add(key)
        return max(float(self._fallback(self.index.features[key])), 0.0)

    def raw(self, arch: Mapping[str, Any]) -> float:
        return float(sum(self._block_raw(k) for k in self.index.keys(arch)))

    def piece_raw(self, blocks: Sequence[Block], cost: Mapping[str, float]) -> float:
        return float(sum(self._block_raw(self.index.key_of(b)) for b in blocks))


class LinearLatencyModel(CalibratedModel):
    """Seed 001 eq. 6 summed over the subnet's blocks, fitted on the LUT's measured blocks."""

    kind = "linear"

    def __init__(self, supernet: Supernet, block_model: BlockLinearModel,
                 known_features: dict[str, dict[str, float]] | None = None, calibration: Affine | None = None):
        super().__init__(calibration)
        self.block_model = block_model
        self.index = BlockIndex(supernet, known_features or {})

    @classmethod
    def from_table(cls, supernet: Supernet, table: pd.DataFrame, calibration: Affine | None = None):
        return cls(supernet, BlockLinearModel.from_table(table), table_features(table), calibration)

    def raw(self, arch: Mapping[str, Any]) -> float:
        return float(sum(self.block_model(self.index.features[k]) for k in self.index.keys(arch)))

    def piece_raw(self, blocks: Sequence[Block], cost: Mapping[str, float]) -> float:
        return float(sum(self.block_model(self.index.features[self.index.key_of(b)]) for b in blocks))


class ProxyLatencyModel(CalibratedModel):
    """A zero-cost proxy (MACs or parameters from `supernet.cost`) fitted linearly to milliseconds."""

    def __init__(self, supernet: Supernet, kind: str, calibration: Affine | None = None):
        super().__init__(calibration)
        if kind not in ("flops", "params"):
            raise ValueError(f"proxy kind: {kind!r}; allowed: ['flops', 'params']")
        self.kind = kind
        self.supernet = supernet
        self._metric = "macs" if kind == "flops" else "params"

    def raw(self, arch: Mapping[str, Any]) -> float:
        arch = arch if isinstance(arch, Arch) else self.supernet.space.validate(arch)
        return float(self.supernet.cost(arch)[self._metric])

    def piece_raw(self, blocks: Sequence[Block], cost: Mapping[str, float]) -> float:
        return float(cost[self._metric])


def build_models(supernet: Supernet, table: pd.DataFrame) -> dict[str, CalibratedModel]:
    """All four models over one LUT group, uncalibrated."""
    return {
        "lut": LutLatencyModel(supernet, table),
        "linear": LinearLatencyModel.from_table(supernet, table),
        "flops": ProxyLatencyModel(supernet, "flops"),
        "params": ProxyLatencyModel(supernet, "params"),
    }


# ---- calibration file -------------------------------------------------------------------------------
CALIBRATION_FORMAT = 1


def calibration_path(lut: str | os.PathLike) -> str:
    """Where the calibration of a LUT lives, beside it: `.../lut.parquet` -> `.../lut.calibration.json`
    (a path or URI, like the LUT's location)."""
    stem = os.path.splitext(storage.basename(lut))[0]
    return storage.join(storage.parent(lut), f"{stem}.calibration.json")


def _read_calibrations(location: str | os.PathLike, what: str) -> dict:
    """The whole calibration file; anything else (not JSON, another JSON) is one UserError line naming it."""
    data = storage.read_json(location, what)
    groups = data.get("groups") if isinstance(data, dict) else None
    problem = None
    if not isinstance(groups, dict):
        problem = "no 'groups' object"
    else:
        for gid, group in groups.items():
            models = group.get("models") if isinstance(group, dict) else None
            if not isinstance(models, dict) or any(not _is_affine((models.get(k) or {}).get("calibration"))
                                                   for k in MODEL_KINDS):
                problem = f"group {gid!r} lacks kappa/epsilon of the models {list(MODEL_KINDS)}"
                break
    if problem:
        raise UserError(f"{what}: {storage.display(location)} is not a raynas calibration file ({problem}); "
                        "allowed: the JSON `raynas profile calibrate` writes")
    return data


def _is_affine(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(value.get(k), (int, float)) and not isinstance(value.get(k), bool)
                                           for k in ("slope", "intercept"))


def save_calibration(location: str | os.PathLike, key: TableKey, record: dict, what: str = "calibration") -> None:
    """Store one group's calibration (coefficients per model + the measured subnets) in the JSON file at
    `location` (path or URI; other groups stay; the group's entry under its id from before precisions
    existed, if any, is replaced too). Atomic, through raynas.storage."""
    data = _read_calibrations(location, what) if storage.exists(location) else \
        {"format": CALIBRATION_FORMAT, "groups": {}}
    if key.legacy_id is not None:
        data["groups"].pop(key.legacy_id, None)
    data["groups"][key.id] = {**asdict(key), **record}
    storage.write_text(location, json.dumps(data, indent=1))


def load_calibration(location: str | os.PathLike, key: TableKey, what: str = "calibration") -> dict | None:
    """One group's calibration record, None when the file or the group is absent. An fp32 group is also
    found under its id from before precisions existed (read as fp32, the only precision there was)."""
    if not storage.exists(location):
        return None
    groups = _read_calibrations(location, what)["groups"]
    if key.id in groups:
        return groups[key.id]
    legacy = groups.get(key.legacy_id) if key.legacy_id is not None else None
    return None if legacy is None else {**legacy, "precision": key.precision}


def load_latency_model(kind: str, lut: str | Path, space: str | Path | None = None, device: str = "local-cpu",
                       supernet: Supernet | None = None, calibration: str | Path | None = None,
                       resolution: int | None = None, num_classes: int | None = None,
                       devices_file: str | Path | None = None, require_calibration: bool = True,
                       precision: str = "fp32") -> CalibratedModel:
    """A ready latency model for `space` on `device` at `precision` from a LUT file and its calibration
    (the group and calibration measured at that precision; a precision the device does not run is refused).

    Pass `supernet` (its space decides resolution/num_classes) or `space` (+ optional overrides).
    Raises `UserError` when the table or its calibration is absent (unless `require_calibration=False`,
    which gives the raw, uncalibrated score; only rankings are meaningful then).
    """
    from raynas.hw.devices import get_device

    if kind not in MODEL_KINDS:
        raise UserError(f"latency model: unknown '{kind}'; allowed: {list(MODEL_KINDS)}")
    if supernet is None:
        if space is None:
            raise UserError("latency model: give `space` or `supernet`")
        from raynas.space import load_space
        from raynas.supernets import build_supernet

        supernet = build_supernet(load_space(space, resolution=resolution, num_classes=num_classes)).eval()
    spec = get_device(device, devices_file)
    spec.check_precision(precision, "precision")
    key = TableKey.of(supernet, spec, precision)
    calib_file = calibration or calibration_path(lut)
    record = load_calibration(calib_file, key)
    if record is None and require_calibration:
        at = "" if precision == "fp32" else f" --precision {precision}"
        raise UserError(f"--lut {storage.display(lut)}: no calibration for {key.id} in {storage.display(calib_file)}; "
                        f"run `raynas profile calibrate --space {key.space} --device {key.device} --lut {lut}{at}`")
    affine = Affine(**record["models"][kind]["calibration"]) if record else None
    table, _ = load_group(lut, key)
    model = _model_of_kind(kind, supernet, table, affine, record)
    model.baseline_ms = (record or {}).get("baseline_ms") or lut_baseline_ms(table)
    return model


def _model_of_kind(kind: str, supernet: Supernet, table: pd.DataFrame, affine: Affine | None,
                   record: dict | None) -> CalibratedModel:
    if kind in ("flops", "params"):
        return ProxyLatencyModel(supernet, kind, affine)
    if kind == "lut":
        return LutLatencyModel(supernet, table, affine)
    stored = record["models"]["linear"].get("block_model") if record else None
    if stored:  # the block model the calibration was fitted with, even if the table grew since
        return LinearLatencyModel(supernet, BlockLinearModel(**stored), table_features(table), affine)
    return LinearLatencyModel.from_table(supernet, table, affine)
