"""MobileNetV4 Universal Inverted Bottleneck (UIB) blocks, elastic and static.

Structure follows timm's `UniversalInvertedResidual` (MobileNetV4, no SE, no layer scale as in the
MNv4-Conv models):

    [dw_start kxk, BN]  ->  pw_exp 1x1, BN, act  ->  [dw_mid kxk, BN, act]  ->  pw_proj 1x1, BN  (+ x)

and the four variants searched by seed 000 differ only in which depthwise convs exist:

    extra_dw: dw_start (K1) and dw_mid (K2)     ib: dw_mid (K2) only
    convnext: dw_start (K1) only                ffn: no depthwise conv

The stride sits where timm puts it: on dw_mid when present, else on dw_start. timm refuses a
strided FFN; KHyper-L (seed 000 Table 12) nevertheless uses one, so we stride its expansion 1x1
conv (the ResNet-style strided 1x1 shortcut), the cheapest choice that keeps the block a pure FFN.

Every conv is a shared `DynamicConvNormAct` (raynas.nn.layers) and reads its full-size weight through a
`fetch(conv)` callable handed down by the supernet, so a hypernetwork can supply the weights instead of
the stored parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from raynas.nn.layers import DynamicConvNormAct
from raynas.supernets.base import WeightFetch, stored_weight

# Index order is size order (cheapest first): min_arch / max_arch and the integer encoding rely on it.
OP_NAMES = ("ffn", "convnext", "ib", "extra_dw")

ACTIVATIONS = ("relu", "relu6", "hardswish")  # the activations a UIB space may declare

def op_has_start_dw(op: str) -> bool:
    return op in ("extra_dw", "convnext")


def op_has_mid_dw(op: str) -> bool:
    return op in ("extra_dw", "ib")


def unit_cost(unit: DynamicConvNormAct, in_ch: int, out_ch: int, k: int, h: int, w: int
              ) -> tuple[int, int, int, int]:
    """(params, macs, out_h, out_w) of one static conv + BN (+ act); matches FlopCounterMode exactly."""
    ho, wo = unit.out_size(h, k), unit.out_size(w, k)
    return (*unit.cost(in_ch, out_ch, k, (ho, wo)), ho, wo)


class ElasticUIB(nn.Module):
    """One UIB variant at one block position; width, kernels and expansion are chosen per call."""

    def __init__(self, op: str, max_in: int, max_out: int, max_mid: int, max_kernel: int, stride: int,
                 act: str):
        super().__init__()
        if op not in OP_NAMES:
            raise ValueError(f"UIB op '{op}' not in {OP_NAMES}")
        self.op, self.stride = op, stride
        start, mid = op_has_start_dw(op), op_has_mid_dw(op)
        units: dict[str, DynamicConvNormAct] = {}
        if start:
            units["dw_start"] = DynamicConvNormAct(max_in, max_in, max_kernel, 1 if mid else stride, True)
        units["pw_exp"] = DynamicConvNormAct(max_in, max_mid, 1, 1 if (start or mid) else stride, act=act)
        if mid:
            units["dw_mid"] = DynamicConvNormAct(max_mid, max_mid, max_kernel, stride, True, act=act)
        units["pw_proj"] = DynamicConvNormAct(max_mid, max_out, 1)
        self.units = nn.ModuleDict(units)

    def _schedule(self, out_ch: int, mid_ch: int, k1: int, k2: int) -> list[tuple[DynamicConvNormAct, int, int]]:
        """(unit, requested out channels, kernel) in execution order."""
        plan = {"dw_start": (0, k1), "pw_exp": (mid_ch, 1), "dw_mid": (0, k2), "pw_proj": (out_ch, 1)}
        return [(unit, *plan[name]) for name, unit in self.units.items()]

    def has_skip(self, in_ch: int, out_ch: int) -> bool:
        return self.stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor, out_ch: int, mid_ch: int, k1: int, k2: int,
                fetch: WeightFetch = stored_weight) -> torch.Tensor:
        y = x
        for unit, out, k in self._schedule(out_ch, mid_ch, k1, k2):
            y = unit(y, out, k, weight=fetch(unit.conv))
        return x + y if self.has_skip(x.shape[1], out_ch) else y

    @torch.no_grad()
    def static(self, in_ch: int, out_ch: int, mid_ch: int, k1: int, k2: int,
               fetch: WeightFetch = stored_weight) -> StaticUIB:
        layers, c = [], in_ch
        for unit, out, k in self._schedule(out_ch, mid_ch, k1, k2):
            layers.append(unit.static(c, out, k, weight=fetch(unit.conv)))
            c = unit.conv.out_channels(c, out)
        return StaticUIB(nn.Sequential(*layers), self.has_skip(in_ch, out_ch))

    def cost(self, in_ch: int, out_ch: int, mid_ch: int, k1: int, k2: int, h: int, w: int
             ) -> tuple[int, int, int, int]:
        params = macs = 0
        c = in_ch
        for unit, out, k in self._schedule(out_ch, mid_ch, k1, k2):
            p, m, h, w = unit_cost(unit, c, out, k, h, w)
            params, macs, c = params + p, macs + m, unit.conv.out_channels(c, out)
        return params, macs, h, w


class StaticUIB(nn.Module):
    """The extracted block: plain Conv2d/BatchNorm2d/activation layers and an optional identity skip."""

    def __init__(self, body: nn.Sequential, residual: bool):
        super().__init__()
        self.body = body
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y
