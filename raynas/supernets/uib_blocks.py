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

Every conv reads its full-size weight through a `fetch(conv)` callable handed down by the
supernet, so a hypernetwork can supply the weights instead of the stored parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from raynas.nn.dynamic import DynamicBatchNorm2d, DynamicConv2d

# Index order is size order (cheapest first): min_arch / max_arch and the integer encoding rely on it.
OP_NAMES = ("ffn", "convnext", "ib", "extra_dw")

ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], type[nn.Module]]] = {
    "relu": (F.relu, nn.ReLU),
    "relu6": (F.relu6, nn.ReLU6),
    "hardswish": (F.hardswish, nn.Hardswish),
}

# (conv module) -> its full-size weight, either the stored parameter or a generated tensor
WeightFetch = Callable[[DynamicConv2d], torch.Tensor]


def stored_weight(conv: DynamicConv2d) -> torch.Tensor:
    return conv.weight


def op_has_start_dw(op: str) -> bool:
    return op in ("extra_dw", "convnext")


def op_has_mid_dw(op: str) -> bool:
    return op in ("extra_dw", "ib")


def conv_out_size(size: int, kernel: int, stride: int) -> int:
    pad = (kernel - 1) // 2
    return (size + 2 * pad - kernel) // stride + 1


def _active_weight(full: torch.Tensor, conv: DynamicConv2d, in_ch: int, out_ch: int, k: int) -> torch.Tensor:
    """The slice of a full-size weight that a (in_ch, out_ch, k) choice uses: same rule as DynamicConv2d."""
    if in_ch > conv.max_in or out_ch > conv.max_out or k > conv.max_kernel or k % 2 == 0:
        raise ValueError(f"conv: in={in_ch}/{conv.max_in} out={out_ch}/{conv.max_out} "
                         f"kernel={k}/{conv.max_kernel} not available")
    if tuple(full.shape) != tuple(conv.weight.shape):
        raise ValueError(f"conv weight: expected shape {tuple(conv.weight.shape)}, got {tuple(full.shape)}")
    w = full[:out_ch] if conv.depthwise else full[:out_ch, :in_ch]
    start = (conv.max_kernel - k) // 2
    return w[..., start : start + k, start : start + k]


class ElasticConvBN(nn.Module):
    """Conv -> BN -> optional activation, elastic in width and (odd, centre-cropped) kernel."""

    def __init__(self, max_in: int, max_out: int, max_kernel: int, stride: int, depthwise: bool,
                 act: str | None):
        super().__init__()
        self.conv = DynamicConv2d(max_in, max_out, max_kernel, stride=stride, depthwise=depthwise)
        self.bn = DynamicBatchNorm2d(max_out)
        self.act = act

    def out_channels(self, in_ch: int, out_ch: int) -> int:
        return in_ch if self.conv.depthwise else out_ch

    def forward(self, x: torch.Tensor, full_weight: torch.Tensor, out_ch: int, k: int) -> torch.Tensor:
        in_ch = x.shape[1]
        out = self.out_channels(in_ch, out_ch)
        w = _active_weight(full_weight, self.conv, in_ch, out, k)
        x = F.conv2d(x, w, None, self.conv.stride, (k - 1) // 2, 1, groups=in_ch if self.conv.depthwise else 1)
        x = self.bn(x)
        return ACTIVATIONS[self.act][0](x) if self.act else x

    @torch.no_grad()
    def static(self, in_ch: int, full_weight: torch.Tensor, out_ch: int, k: int) -> nn.Sequential:
        out = self.out_channels(in_ch, out_ch)
        # skip_init: the weights are overwritten at once, so random initialisation would be wasted time.
        conv = nn.utils.skip_init(nn.Conv2d, in_ch, out, k, self.conv.stride, (k - 1) // 2,
                                  groups=in_ch if self.conv.depthwise else 1, bias=False)
        conv.weight.copy_(_active_weight(full_weight, self.conv, in_ch, out, k))
        layers = [conv, self.bn.static(out)]
        if self.act:
            layers.append(ACTIVATIONS[self.act][1]())
        return nn.Sequential(*layers)

    def cost(self, in_ch: int, out_ch: int, k: int, h: int, w: int) -> tuple[int, int, int, int]:
        """(params, macs, out_h, out_w) of the static conv + BN; matches FlopCounterMode exactly."""
        out = self.out_channels(in_ch, out_ch)
        per_out = (1 if self.conv.depthwise else in_ch) * k * k
        ho, wo = conv_out_size(h, k, self.conv.stride), conv_out_size(w, k, self.conv.stride)
        return out * per_out + 2 * out, out * per_out * ho * wo, ho, wo


class ElasticUIB(nn.Module):
    """One UIB variant at one block position; width, kernels and expansion are chosen per call."""

    def __init__(self, op: str, max_in: int, max_out: int, max_mid: int, max_kernel: int, stride: int,
                 act: str):
        super().__init__()
        if op not in OP_NAMES:
            raise ValueError(f"UIB op '{op}' not in {OP_NAMES}")
        self.op, self.stride = op, stride
        start, mid = op_has_start_dw(op), op_has_mid_dw(op)
        units: dict[str, ElasticConvBN] = {}
        if start:
            units["dw_start"] = ElasticConvBN(max_in, max_in, max_kernel, 1 if mid else stride, True, None)
        units["pw_exp"] = ElasticConvBN(max_in, max_mid, 1, 1 if (start or mid) else stride, False, act)
        if mid:
            units["dw_mid"] = ElasticConvBN(max_mid, max_mid, max_kernel, stride, True, act)
        units["pw_proj"] = ElasticConvBN(max_mid, max_out, 1, 1, False, None)
        self.units = nn.ModuleDict(units)

    def _schedule(self, out_ch: int, mid_ch: int, k1: int, k2: int) -> list[tuple[ElasticConvBN, int, int]]:
        """(unit, requested out channels, kernel) in execution order."""
        plan = {"dw_start": (0, k1), "pw_exp": (mid_ch, 1), "dw_mid": (0, k2), "pw_proj": (out_ch, 1)}
        return [(unit, *plan[name]) for name, unit in self.units.items()]

    def has_skip(self, in_ch: int, out_ch: int) -> bool:
        return self.stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor, out_ch: int, mid_ch: int, k1: int, k2: int,
                fetch: WeightFetch = stored_weight) -> torch.Tensor:
        y = x
        for unit, out, k in self._schedule(out_ch, mid_ch, k1, k2):
            y = unit(y, fetch(unit.conv), out, k)
        return x + y if self.has_skip(x.shape[1], out_ch) else y

    @torch.no_grad()
    def static(self, in_ch: int, out_ch: int, mid_ch: int, k1: int, k2: int,
               fetch: WeightFetch = stored_weight) -> StaticUIB:
        layers, c = [], in_ch
        for unit, out, k in self._schedule(out_ch, mid_ch, k1, k2):
            layers.append(unit.static(c, fetch(unit.conv), out, k))
            c = unit.out_channels(c, out)
        return StaticUIB(nn.Sequential(*layers), self.has_skip(in_ch, out_ch))

    def cost(self, in_ch: int, out_ch: int, mid_ch: int, k1: int, k2: int, h: int, w: int
             ) -> tuple[int, int, int, int]:
        params = macs = 0
        c = in_ch
        for unit, out, k in self._schedule(out_ch, mid_ch, k1, k2):
            p, m, h, w = unit.cost(c, out, k, h, w)
            params, macs, c = params + p, macs + m, unit.out_channels(c, out)
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


class StaticHead(nn.Module):
    """MobileNetV3 head: 1x1 conv + BN + act -> global pool -> linear + act -> dropout -> classifier."""

    def __init__(self, conv: nn.Sequential, fc: nn.Linear, act: nn.Module, dropout: float, classifier: nn.Linear):
        super().__init__()
        self.conv = conv
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = fc
        self.act = act
        self.dropout = nn.Dropout(dropout)
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv(x)).flatten(1)
        return self.classifier(self.dropout(self.act(self.fc(x))))
