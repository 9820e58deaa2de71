"""Elastic building blocks shared by every supernet family (no supernet code: that is raynas.supernets)."""

from raynas.nn.dynamic import (
    DynamicBatchNorm2d,
    DynamicConv2d,
    DynamicLayerNorm,
    DynamicLinear,
    make_divisible,
)
from raynas.nn.layers import DynamicConvNormAct, DynamicInvertedResidual, act_fn, act_layer, conv_out_size

__all__ = ["DynamicBatchNorm2d", "DynamicConv2d", "DynamicConvNormAct", "DynamicInvertedResidual",
           "DynamicLayerNorm", "DynamicLinear", "act_fn", "act_layer", "conv_out_size", "make_divisible"]
