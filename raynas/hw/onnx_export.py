"""Export a static module to ONNX, verified numerically in onnxruntime before the file is kept, optionally
converted to the precision a board runs (raynas.hw.precision) and verified again."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from raynas import storage
from raynas.hw.onnx_accuracy import ort_session
from raynas.hw.precision import check_precision, convert, size_mb

OPSET = 17
# FP16 keeps ~3 significant digits, and the error grows with depth: the converted graph is refused only when
# it is clearly broken (differs by more than this fraction of the output's magnitude, or is not finite).
FP16_TOLERANCE = 0.05


class ExportMismatch(RuntimeError):
    pass


@dataclass(frozen=True)
class VerifiedOnnx:
    """A subnet as ONNX: the FP32 graph (verified against PyTorch), the same at `info["precision"]` (the FP32
    bytes again for fp32), and what the checks found: max_abs_diff (FP32 vs PyTorch), max_abs_diff_vs_fp32
    (the precision's output vs FP32's, see `verified_onnx`), precision, size_mb, fp32_size_mb."""

    fp32: bytes
    model: bytes
    info: dict


def _export(module: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool) -> None:
    dynamic_axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    torch.onnx.export(module, (example,), str(path), input_names=["input"], output_names=["output"],
                      opset_version=OPSET, dynamic_axes=dynamic_axes, dynamo=False)


def _max_abs_diff(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - expected))) if expected.size else 0.0


def _check_precision(fp32: bytes, model: bytes, precision: str, x: np.ndarray) -> float:
    """Run the converted model (already passed by onnx.checker in `convert`) beside the FP32 one on `x`: its
    outputs must be finite, FP16's close to FP32's; INT8's difference is reported only, since it depends on
    how well the calibration covered `x`."""
    expected = ort_session(fp32).run(None, {"input": x})[0]
    got = ort_session(model).run(None, {"input": x})[0]
    if not np.all(np.isfinite(got)):
        raise ExportMismatch(f"the {precision} model's output is not finite (overflow in the conversion)")
    diff = _max_abs_diff(got, expected)
    tolerance = FP16_TOLERANCE * max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    if precision == "fp16" and diff > tolerance:
        raise ExportMismatch(f"the fp16 model's output differs from FP32 by {diff:.3g} (> {tolerance:.3g})")
    return diff


@torch.no_grad()
def verified_onnx(module: nn.Module, input_shape: tuple[int, ...], precision: str = "fp32",
                  calibration: Iterable[np.ndarray] | None = None, atol: float = 1e-4,
                  dynamic_batch: bool = True, seed: int = 0) -> VerifiedOnnx:
    """`module` (eval mode) as ONNX, checked: ORT matches PyTorch within `atol` in FP32; then, at another
    `precision`, converted (`calibration`: int8 input batches, training images; None: seeded inputs, fit
    for timing only), passed by onnx.checker and run in ORT beside FP32, on the first calibration batch
    (inputs of the calibrated ranges) or else the FP32 check's seeded input. Raises ExportMismatch when a
    check fails."""
    check_precision(precision)
    module = module.eval()
    example = torch.randn(input_shape, generator=torch.Generator().manual_seed(seed))
    expected = module(example).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        _export(module, example, tmp_path, dynamic_batch)
        onnx.checker.check_model(onnx.load(str(tmp_path)))
        fp32 = tmp_path.read_bytes()
    diff = _max_abs_diff(ort_session(fp32).run(None, {"input": example.numpy()})[0], expected)
    if not np.isfinite(diff) or diff > atol:
        raise ExportMismatch(f"ONNX output differs from PyTorch by {diff:.3g} (> {atol})")
    model, vs_fp32 = fp32, 0.0
    if precision != "fp32":
        calibration = None if calibration is None else [np.asarray(b, dtype=np.float32) for b in calibration]
        model = convert(fp32, precision, calibration)
        x = calibration[0] if calibration and dynamic_batch else example.numpy()
        vs_fp32 = _check_precision(fp32, model, precision, x)
    return VerifiedOnnx(fp32, model, {"max_abs_diff": diff, "precision": precision, "size_mb": size_mb(model),
                                      "fp32_size_mb": size_mb(fp32), "max_abs_diff_vs_fp32": vs_fp32})


def export_onnx(module: nn.Module, input_shape: tuple[int, ...], out: str | os.PathLike, atol: float = 1e-4,
                dynamic_batch: bool = True, seed: int = 0, precision: str = "fp32",
                calibration: Iterable[np.ndarray] | None = None) -> dict:
    """Write `module` (eval mode) as ONNX at `out` (a local path or URI, through raynas.storage) at
    `precision`, after the checks of `verified_onnx`.

    Returns {"path", "max_abs_diff", "precision", "size_mb", "fp32_size_mb", "max_abs_diff_vs_fp32"}.
    Nothing is written when a check fails.
    """
    verified = verified_onnx(module, input_shape, precision, calibration, atol, dynamic_batch, seed)
    storage.write_bytes(str(out), verified.model)
    return {"path": str(out), **verified.info}
