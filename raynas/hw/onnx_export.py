"""Export a static module to ONNX, verified numerically in onnxruntime before the file is kept."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from raynas import storage

OPSET = 17


class ExportMismatch(RuntimeError):
    pass


def _export(module: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool) -> None:
    dynamic_axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    torch.onnx.export(module, (example,), str(path), input_names=["input"], output_names=["output"],
                      opset_version=OPSET, dynamic_axes=dynamic_axes, dynamo=False)


def ort_session(path: str | Path, threads: int = 1, providers: list[str] | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


@torch.no_grad()
def export_onnx(module: nn.Module, input_shape: tuple[int, ...], out: str | os.PathLike, atol: float = 1e-4,
                dynamic_batch: bool = True, seed: int = 0) -> dict:
    """Write `module` (eval mode) as ONNX at `out` (a local path or URI, through raynas.storage) after
    checking ORT matches PyTorch within `atol`.

    Returns {"path", "max_abs_diff"}. Nothing is written when the check fails.
    """
    out = str(out)
    module = module.eval()
    example = torch.randn(input_shape, generator=torch.Generator().manual_seed(seed))
    expected = module(example).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        _export(module, example, tmp_path, dynamic_batch)
        onnx.checker.check_model(onnx.load(str(tmp_path)))
        got = ort_session(tmp_path).run(None, {"input": example.numpy()})[0]
        diff = float(np.max(np.abs(got - expected))) if expected.size else 0.0
        if not np.isfinite(diff) or diff > atol:
            raise ExportMismatch(f"ONNX output differs from PyTorch by {diff:.3g} (> {atol})")
        storage.write_bytes(out, tmp_path.read_bytes())
    return {"path": str(out), "max_abs_diff": diff}
