"""Elastic building blocks shared by every supernet family."""

from raynas.nn.dynamic import (
    DynamicBatchNorm2d,
    DynamicConv2d,
    DynamicLayerNorm,
    DynamicLinear,
    make_divisible,
)

__all__ = ["DynamicBatchNorm2d", "DynamicConv2d", "DynamicLayerNorm", "DynamicLinear", "make_divisible"]
