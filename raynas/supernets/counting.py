"""Exact parameter and MAC counts of a static module, by running it once under a FLOP counter."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


@torch.no_grad()
def count_macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of conv / linear / matmul / attention ops (FLOP counter / 2)."""
    was_training = module.training
    module.eval()
    x = torch.zeros(input_shape)
    # The math backend of scaled_dot_product_attention runs as plain matmuls, which the counter sees; the
    # fused CPU kernel of recent torch releases is not counted at all.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module(x)
    module.train(was_training)
    return int(counter.get_total_flops()) // 2


def count_cost(module: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    return {"params": count_params(module), "macs": count_macs(module, input_shape)}
