"""Seed 002's quantization table (Appendix D.2, §5.5 "all models in FP32 and FP16/INT8"): for every
precision a device runs, the big model, the little model and the routed pair exported at that precision,
their accuracy on the validation split in onnxruntime, latency on the device and size on the board.

Per precision the pair is exported (raynas.biglittle.deploy.export_pair, into `<out>/<precision>/`) with
its pieces timed under the device's protocol on this node, then run on the validation split as deployed.
Columns of a row:

  model           big | little | routed  (big/little: trunk + branch; routed: trunk, router, one branch)
  accuracy        on the validation split, in onnxruntime at that precision
  latency_ms      the device protocol's median of each piece, summed over the model's pieces (routed: the
                  expected latency at the routing ratio it showed, trunk + router + p little + (1-p) big)
  run_median_ms   median per-input wall time running the model input by input as deployed
  size_mb         ONNX bytes / 10^6 of the model's files
  macs            of the model (routed: deployed E[MACs] at its routing ratio)
  accuracy_vs_fp32, latency_vs_fp32   accuracy change and latency ratio against the same model in FP32
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from raynas import storage
from raynas.biglittle.coupling import CoupledSupernet
from raynas.biglittle.deploy import (
    DEFAULT_CALIBRATION_IMAGES,
    export_pair,
    model_size_mb,
    piece_timed_costs,
    run_routed,
)
from raynas.biglittle.evaluate import EvalData
from raynas.hw.devices import DeviceSpec

MODELS = ("big", "little", "routed")
COLUMNS = ["device", "precision", "model", "accuracy", "latency_ms", "run_median_ms", "size_mb", "macs",
           "routing_ratio", "inputs", "accuracy_vs_fp32", "latency_vs_fp32"]


def precision_rows(manifest: Mapping[str, Any], run: Mapping[str, Any], device: str) -> list[dict[str, Any]]:
    """The three rows of one precision from its export manifest and its run on the validation split."""
    costs = piece_timed_costs(manifest)
    timed = costs.latency_ms is not None
    p = run["routing_ratio"]
    rows = []
    for model in MODELS:
        if model == "routed":
            acc, run_ms, macs = run["accuracy"], run["latency_ms"]["median"], run["e_macs_deployed"]
            latency = costs.deployed(p, "latency_ms") if timed else float("nan")
            size, ratio = model_size_mb(manifest, "pair"), p
        else:
            ref = run[f"always_{model}"]
            acc, run_ms, macs = ref["accuracy"], ref["median_latency_ms"], costs.model(model)
            latency = costs.model(model, "latency_ms") if timed else float("nan")
            size, ratio = model_size_mb(manifest, model), float(model == "little")
        rows.append({"device": device, "precision": manifest["precision"], "model": model, "accuracy": acc,
                     "latency_ms": latency, "run_median_ms": run_ms, "size_mb": size, "macs": float(macs),
                     "routing_ratio": ratio, "inputs": run["inputs"]})
    return rows


def against_fp32(table: pd.DataFrame) -> pd.DataFrame:
    """Add each row's accuracy change and latency ratio against the same model in FP32 (NaN without FP32)."""
    fp32 = table[table["precision"] == "fp32"].set_index("model")
    base_acc = table["model"].map(fp32["accuracy"]) if len(fp32) else float("nan")
    base_ms = table["model"].map(fp32["latency_ms"]) if len(fp32) else float("nan")
    return table.assign(accuracy_vs_fp32=table["accuracy"] - base_acc, latency_vs_fp32=table["latency_ms"] / base_ms)


def precision_table(model: CoupledSupernet, pair: Mapping[str, Any], data: EvalData,
                    data_cfg: Mapping[str, Any] | None, out: str | os.PathLike, tau: float, device: DeviceSpec,
                    precisions: Sequence[str] | None = None, devices_file: str | None = None,
                    calibration_images: int = DEFAULT_CALIBRATION_IMAGES, limit: int | None = None,
                    warmup: int = 10) -> pd.DataFrame:
    """The table for `precisions` (default every one the device runs; each checked against the device),
    with each precision's export under `<out>/<precision>/`."""
    precisions = [device.check_precision(p, "--precisions") for p in (precisions or device.runs_precisions)]
    rows = []
    for precision in precisions:
        where = storage.join(out, precision)
        manifest = export_pair(model, pair, data, where, tau, measure_device=device.name, devices_file=devices_file,
                               precision=precision, calibration_images=calibration_images)
        run = run_routed(where, data_cfg, split="val", limit=limit, threads=device.threads, warmup=warmup,
                         providers=device.providers)
        rows += precision_rows(manifest, run, device.name)
    return against_fp32(pd.DataFrame(rows))[COLUMNS]


def write_precision_table(table: pd.DataFrame, out: str | os.PathLike) -> dict[str, str]:
    """`precisions.parquet` and `precisions.md` in `out`."""
    from raynas.report.pareto_report import markdown_table

    parquet = storage.write_pandas(storage.join(out, "precisions.parquet"), table)
    md = storage.write_text(storage.join(out, "precisions.md"),
                            "# Big/little at each precision\n\n"
                            + markdown_table(table.to_dict("records"), list(table.columns)) + "\n")
    return {"parquet": parquet, "markdown": md}
