"""A subnet as a board runs it: BatchNorm recalibrated, exported to verified ONNX, converted to the deploy
precision, and scored in onnxruntime on the validation split.

Quantization changes what a subnet answers, and not by the same amount for every subnet, so the accuracy
a user ships is the deployed model's, measured here beside the supernet's. The evaluator actors do it: they
hold the supernet, the BN-recalibration images (which also calibrate INT8 activation ranges: training
images, never validation ones) and the validation split.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from raynas import config as c
from raynas.hw.precision import PRECISIONS
from raynas.space import Arch

DEPLOY_DEFAULTS = {"precision": "fp32", "quantized_accuracy": False, "calibration_images": 64}


@dataclass(frozen=True)
class DeployConfig:
    """The `deploy:` section: the precision front members are written at (and their latency predicted and
    measured at); `quantized_accuracy` makes every candidate's accuracy objective its deployed accuracy;
    `calibration_images` training images calibrate INT8 activation ranges."""

    precision: str = "fp32"
    quantized_accuracy: bool = False
    calibration_images: int = 64


def deploy_section(cfg: Any, where: str = "deploy") -> dict[str, Any]:
    d = c.with_defaults(cfg, DEPLOY_DEFAULTS, where)
    c.choice(d["precision"], f"{where}.precision", PRECISIONS)
    c.boolean(d["quantized_accuracy"], f"{where}.quantized_accuracy")
    c.integer(d["calibration_images"], f"{where}.calibration_images", 1)
    return d


def deploy_subnet(supernet, arch: Arch, bn_loader: Iterable, val_loader: Iterable, bn_samples: int,
                  deploy: DeployConfig) -> tuple[bytes, dict[str, Any]]:
    """(the ONNX bytes at `deploy.precision`, {accuracy_supernet, accuracy_deployed, precision, size_mb,
    onnx_max_abs_diff}) of subnet `arch`, exported with its own recalibrated BN statistics."""
    from raynas.hw.onnx_accuracy import calibration_batches, labelled_arrays, onnx_accuracy
    from raynas.hw.onnx_export import verified_onnx
    from raynas.train.bn import evaluate_subnet

    accuracy = evaluate_subnet(supernet, arch, bn_loader, val_loader, bn_samples)  # leaves arch's BN stats
    calibration = None
    if deploy.precision == "int8":
        calibration = calibration_batches(labelled_arrays(bn_loader)[0], deploy.calibration_images)
    verified = verified_onnx(supernet.extract(arch).cpu(), supernet.input_shape(1), deploy.precision, calibration)
    images, labels = labelled_arrays(val_loader)
    return verified.model, {
        "accuracy_supernet": float(accuracy), "accuracy_deployed": onnx_accuracy(verified.model, images, labels),
        "precision": deploy.precision, "size_mb": verified.info["size_mb"],
        "onnx_max_abs_diff": verified.info["max_abs_diff"],
        "max_abs_diff_vs_fp32": verified.info["max_abs_diff_vs_fp32"]}
