"""Operator and design features of one static block: the regressors of seed 001's linear model (eq. 6).

    L(m) = sum_i l_i * o_i(m) + sum_j t_j * d_j(m)

`o_i(m)` is the cost of operator type i in block m (MACs of dense, depthwise and pointwise convolutions,
linear layers and attention matmuls; elements touched by activations, normalisations and pooling; the
number of operators, which is a fixed launch cost each), `d_j(m)` are design parameters (input and
output channels, spatial size, tensor elements in and out). One forward pass at batch 1 collects them.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

FEATURES = (
    "conv_macs", "dwconv_macs", "pwconv_macs", "linear_macs", "matmul_macs",
    "act_elems", "norm_elems", "pool_elems", "n_ops",
    "in_elems", "out_elems", "in_channels", "out_channels", "spatial",
)

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                nn.Softmax, nn.LeakyReLU, nn.Mish)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
_POOLS = (nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool1d)


def _numel(t) -> int:
    return int(t.numel()) if isinstance(t, torch.Tensor) else 0


def _channels_and_spatial(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 4:  # N, C, H, W
        return shape[1], shape[2] * shape[3]
    if len(shape) == 3:  # N, tokens, dim
        return shape[2], shape[1]
    return (shape[-1] if shape else 1), 1


@torch.no_grad()
def block_features(module: nn.Module, in_shape: tuple[int, ...]) -> dict[str, float]:
    feats = dict.fromkeys(FEATURES, 0.0)
    counted_macs = 0

    def hook(mod, inputs, output):
        nonlocal counted_macs
        feats["n_ops"] += 1
        out = _numel(output)
        if isinstance(mod, nn.Conv2d):
            k = math.prod(mod.kernel_size)
            macs = out * (mod.in_channels // mod.groups) * k
            counted_macs += macs
            if mod.groups > 1 and mod.groups == mod.in_channels:
                feats["dwconv_macs"] += macs
            elif k == 1:
                feats["pwconv_macs"] += macs
            else:
                feats["conv_macs"] += macs
        elif isinstance(mod, nn.Linear):
            macs = out * mod.in_features
            counted_macs += macs
            feats["linear_macs"] += macs
        elif isinstance(mod, _ACTIVATIONS):
            feats["act_elems"] += out
        elif isinstance(mod, _NORMS):
            feats["norm_elems"] += out
        elif isinstance(mod, _POOLS):
            feats["pool_elems"] += _numel(inputs[0]) if inputs else out

    leaves = [m for m in module.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = module.training
    module.eval()
    x = torch.zeros(in_shape)
    try:
        with FlopCounterMode(display=False) as counter:
            y = module(x)
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    # Whatever the counter saw beyond conv/linear layers is attention's matmuls (q@k^T, attn@v).
    feats["matmul_macs"] = max(counter.get_total_flops() // 2 - counted_macs, 0)
    feats["in_elems"] = _numel(x)
    feats["out_elems"] = _numel(y)
    feats["in_channels"], feats["spatial"] = _channels_and_spatial(tuple(x.shape))
    feats["out_channels"] = _channels_and_spatial(tuple(y.shape))[0] if isinstance(y, torch.Tensor) else 0
    return {k: float(v) for k, v in feats.items()}
