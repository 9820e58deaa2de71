"""The numeric precision a model is deployed at, and turning a verified FP32 ONNX graph into it.

Boards run models in INT8 or FP16, not FP32 (seed 002 profiles every model "in FP32 and FP16/INT8
quantized variants"), so latency, energy and accuracy are stated per precision:

* fp32: the graph as exported and verified against PyTorch (raynas.hw.onnx_export).
* fp16: every float initializer and op converted by onnxruntime's converter; inputs and outputs stay
  float32 (cast once at the graph's edges) so callers feed the same tensors at every precision.
* int8: static QDQ quantization with onnxruntime's tools: per-channel symmetric int8 weights, uint8
  activations whose ranges come from calibration batches (images of the training data for accuracy;
  any seeded inputs when only latency matters, because the ranges do not change the ops that run).

This module imports neither torch nor the supernets: a board converts blocks itself.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx

from raynas import config as c

PRECISIONS = ("fp32", "fp16", "int8")
# What each onnxruntime execution provider runs natively, as a device declares by default
# (devices.yaml `precisions` overrides): the CPU provider has int8 kernels but converts fp16 back to fp32,
# CUDA has fp16 kernels but no int8 conv, TensorRT and OpenVINO build engines at all three.
RUNTIME_PRECISIONS: dict[str, tuple[str, ...]] = {
    "cpu": ("fp32", "int8"),
    "cuda": ("fp32", "fp16"),
    "tensorrt": ("fp32", "fp16", "int8"),
    "openvino": ("fp32", "fp16", "int8"),
}
DEFAULT_CALIBRATION_BATCHES = 8  # calibration batches when only latency matters (ranges do not change timing)


def check_precision(precision: str, where: str = "precision") -> str:
    return c.choice(precision, where, PRECISIONS)


class _Batches:
    """onnxruntime's CalibrationDataReader protocol (`get_next` -> feed dict or None) over arrays."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]):
        self._feeds = iter({input_name: np.ascontiguousarray(b, dtype=np.float32)} for b in batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def seeded_batches(input_shape: Sequence[int], count: int = DEFAULT_CALIBRATION_BATCHES,
                   seed: int = 0) -> list[np.ndarray]:
    """Calibration inputs for a latency-only conversion: standard-normal tensors of `input_shape`."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(tuple(input_shape)).astype(np.float32) for _ in range(count)]


def _input_shape(model: onnx.ModelProto) -> tuple[int, ...]:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.dim_value > 0 else 1 for d in dims)  # a symbolic batch dim -> 1


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    converted = OnnxModel(convert_float_to_float16(model, keep_io_types=True))
    # The converter appends the input casts after the nodes that read them; the ONNX checker (and some
    # runtimes) require topological order.
    converted.topological_sort()
    return converted.model


@contextlib.contextmanager
def _quiet_root_warnings():
    """The quantizer advises pre-processing (and warns of shared biases) on the root logger for every
    model; raynas converts hundreds of blocks, so these lines would bury the progress output."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _unshared_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every `Identity` of an initializer replaced by a copy of that initializer.

    The exporter merges equal constants (e.g. the zero biases of an untrained subnet) into one initializer
    read through Identity nodes; the quantizer cannot quantize a bias it does not see as an initializer, and
    onnxruntime then runs those convolutions in fp32 between Dequantize and Quantize (10 of 64 convs of an
    mbv3 subnet at 224 px: int8 5.99 ms instead of 4.1 ms)."""
    model = copy.deepcopy(model)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    for node in [n for n in graph.node if n.op_type == "Identity" and n.input[0] in initializers]:
        tensor = copy.deepcopy(initializers[node.input[0]])
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        graph.node.remove(node)
    return model


def to_int8(model: onnx.ModelProto, calibration: Iterable[np.ndarray] | None = None) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    model = _unshared_initializers(model)
    batches = seeded_batches(_input_shape(model)) if calibration is None else calibration
    with tempfile.TemporaryDirectory() as tmp, _quiet_root_warnings():
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, str(src))
        quantize_static(str(src), str(dst), _Batches(model.graph.input[0].name, batches),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        return onnx.load(str(dst))


def convert(model_bytes: bytes, precision: str, calibration: Iterable[np.ndarray] | None = None) -> bytes:
    """The FP32 ONNX model `model_bytes` at `precision`, checked by onnx.checker.

    `calibration`: input batches for int8 activation ranges (None: seeded normal inputs, fit for timing only).
    """
    check_precision(precision)
    if precision == "fp32":
        return model_bytes
    model = onnx.load_from_string(model_bytes)
    converted = to_fp16(model) if precision == "fp16" else to_int8(model, calibration)
    onnx.checker.check_model(converted)
    return converted.SerializeToString()


def size_mb(model_bytes: bytes) -> float:
    """The serialized model's size in MB (10^6 bytes), what a board stores."""
    return len(model_bytes) / 1e6
