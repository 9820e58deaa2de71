"""Composite elastic layers shared by the supernet families, and the analytic cost of their static twins.

`DynamicConvNormAct` (conv -> BatchNorm -> optional activation) and `DynamicInvertedResidual` (MBConv)
are what every convolutional family is built from (OFA's `elastic_nn` / timm's `ConvNormAct` idea):
each slices its largest weights per forward and returns a plain-PyTorch twin from `static(...)`.
Activations are looked up by name through timm's `get_act_layer` / `get_act_fn`.

Costs count what `raynas.supernets.counting` counts: conv / linear multiply-accumulates and every
parameter (BatchNorm affine included); not norms, activations, pooling or elementwise ops.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from timm.layers import get_act_fn, get_act_layer
from torch import nn

from raynas.nn.dynamic import DynamicBatchNorm2d, DynamicConv2d, fan_out_init

# Space files spell MobileNetV3's activation as OFA does; timm calls it hard_swish.
_ACT_ALIASES = {"hswish": "hard_swish"}


def act_layer(name: str) -> nn.Module:
    """A fresh activation module for a space file's activation name."""
    return get_act_layer(_ACT_ALIASES.get(name, name))()


def act_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The functional form of `act_layer(name)` (same numerics)."""
    return get_act_fn(_ACT_ALIASES.get(name, name))


def conv_out_size(size: int, kernel: int, stride: int) -> int:
    """Spatial size after a 'same'-padded conv (padding (kernel - 1) // 2), as DynamicConv2d pads."""
    return (size + 2 * ((kernel - 1) // 2) - kernel) // stride + 1


def conv_cost(cin: int, cout: int, kernel: int, out_hw: tuple[int, int], depthwise: bool = False,
              bias: bool = False, bn: bool = True) -> tuple[int, int]:
    """(params, MACs) of a conv (+ BatchNorm affine) producing an `out_hw` map."""
    per_out = (1 if depthwise else cin) * kernel * kernel
    params = cout * per_out + (cout if bias else 0) + (2 * cout if bn else 0)
    return params, cout * per_out * out_hw[0] * out_hw[1]


def add_costs(*costs: tuple[int, int]) -> tuple[int, int]:
    return sum(c[0] for c in costs), sum(c[1] for c in costs)


class DynamicConvNormAct(nn.Module):
    """Conv -> BatchNorm -> activation, elastic in width and (odd, centre-cropped) kernel.

    `act` is the layer's own activation (None: none); a family that searches the activation passes
    it per call instead. `weight` (forward / static) replaces the stored largest conv weight, which is
    how a hypernetwork supplies generated weights.
    """

    def __init__(self, max_in: int, max_out: int, kernel: int = 1, stride: int = 1, depthwise: bool = False,
                 bias: bool = False, act: str | None = None, init: Callable[[torch.Tensor], None] = fan_out_init):
        super().__init__()
        self.conv = DynamicConv2d(max_in, max_out, kernel, stride, depthwise=depthwise, bias=bias, init=init)
        self.bn = DynamicBatchNorm2d(max_out)
        self.act = act

    def forward(self, x: torch.Tensor, out_channels: int | None = None, kernel: int | None = None,
                act: str | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
        x = self.bn(self.conv(x, out_channels, kernel, weight))
        act = act or self.act
        return act_fn(act)(x) if act else x

    @torch.no_grad()
    def static(self, in_ch: int, out_channels: int | None = None, kernel: int | None = None,
               act: str | None = None, weight: torch.Tensor | None = None) -> nn.Sequential:
        conv = self.conv.static(in_ch, out_channels, kernel, weight)
        layers = OrderedDict(conv=conv, bn=self.bn.static(conv.out_channels))
        act = act or self.act
        if act:
            layers["act"] = act_layer(act)
        return nn.Sequential(layers)

    def out_size(self, size: int, kernel: int | None = None) -> int:
        return conv_out_size(size, kernel or self.conv.max_kernel, self.conv.stride)

    def cost(self, in_ch: int, out_channels: int | None, kernel: int | None, out_hw: tuple[int, int]
             ) -> tuple[int, int]:
        """(params, MACs) of `static(in_ch, out_channels, kernel)` producing an `out_hw` map."""
        conv = self.conv
        return conv_cost(in_ch, conv.out_channels(in_ch, out_channels), kernel or conv.max_kernel, out_hw,
                         conv.depthwise, conv.bias is not None)


class DynamicSqueezeExcite(nn.Module):
    """MobileNetV3 squeeze-excite: global pool, 1x1 reduce + ReLU, 1x1 expand + hard-sigmoid gate."""

    def __init__(self, max_channels: int, max_mid: int):
        super().__init__()
        self.reduce = DynamicConv2d(max_channels, max_mid, 1, bias=True)
        self.expand = DynamicConv2d(max_mid, max_channels, 1, bias=True)

    def forward(self, x: torch.Tensor, mid: int) -> torch.Tensor:
        return squeeze_excite(x, lambda s: self.reduce(s, mid), lambda s: self.expand(s, x.shape[1]))

    @torch.no_grad()
    def static(self, channels: int, mid: int) -> SqueezeExcite:
        return SqueezeExcite(self.reduce.static(channels, mid), self.expand.static(mid, channels))


def squeeze_excite(x: torch.Tensor, reduce: Callable, expand: Callable) -> torch.Tensor:
    s = torch.relu(reduce(torch.nn.functional.adaptive_avg_pool2d(x, 1)))
    return x * torch.nn.functional.hardsigmoid(expand(s))


class SqueezeExcite(nn.Module):
    def __init__(self, reduce: nn.Conv2d, expand: nn.Conv2d):
        super().__init__()
        self.reduce, self.expand = reduce, expand

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return squeeze_excite(x, self.reduce, self.expand)


class InvertedResidual(nn.Module):
    """Static MBConv: expand 1x1 -> depthwise kxk -> squeeze-excite -> project 1x1 (+ identity skip).

    Absent parts are `nn.Identity` (no ONNX node, no cost)."""

    def __init__(self, expand: nn.Module, depthwise: nn.Module, se: nn.Module, project: nn.Module, residual: bool):
        super().__init__()
        self.expand, self.depthwise, self.se, self.project = expand, depthwise, se, project
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class DynamicInvertedResidual(nn.Module):
    """Elastic MBConv (MobileNetV2/V3, OFA): hidden width, kernel, SE width and output width per call.

    `hidden=None` runs no expand conv (the depthwise conv reads the input: MobileNetV2's t = 1 block);
    a block built with `has_expand=False` has none at all. The caller decides the residual, since a
    family's rule for it (shapes, or the declared stage table) is its own.
    """

    def __init__(self, max_in: int, max_out: int, max_hidden: int, max_kernel: int, stride: int, act: str,
                 max_se_mid: int = 0, has_expand: bool = True):
        super().__init__()
        mid = max(max_hidden, max_in)
        self.stride = stride
        self.expand = DynamicConvNormAct(max_in, max_hidden, 1, act=act) if has_expand else None
        self.depthwise = DynamicConvNormAct(mid, mid, max_kernel, stride, depthwise=True, act=act)
        self.se = DynamicSqueezeExcite(mid, max_se_mid) if max_se_mid else None
        self.project = DynamicConvNormAct(mid, max_out, 1)

    def _check(self, hidden: int | None) -> None:
        if hidden is not None and self.expand is None:
            raise ValueError(f"DynamicInvertedResidual: an expand conv to {hidden} channels is not available")

    def forward(self, x: torch.Tensor, out_channels: int, hidden: int | None, kernel: int, residual: bool,
                se_mid: int = 0) -> torch.Tensor:
        self._check(hidden)
        y = self.expand(x, hidden) if hidden is not None else x
        y = self.depthwise(y, kernel=kernel)
        if se_mid:
            y = self.se(y, se_mid)
        y = self.project(y, out_channels)
        return x + y if residual else y

    @torch.no_grad()
    def static(self, in_ch: int, out_channels: int, hidden: int | None, kernel: int, residual: bool,
               se_mid: int = 0) -> InvertedResidual:
        self._check(hidden)
        mid = in_ch if hidden is None else hidden
        return InvertedResidual(
            nn.Identity() if hidden is None else self.expand.static(in_ch, hidden),
            self.depthwise.static(mid, kernel=kernel),
            self.se.static(mid, se_mid) if se_mid else nn.Identity(),
            self.project.static(mid, out_channels), residual)

    def cost(self, in_ch: int, out_channels: int, hidden: int | None, kernel: int, in_hw: tuple[int, int],
             se_mid: int = 0) -> tuple[int, int]:
        """(params, MACs) of `static(...)` fed an `in_hw` map."""
        mid = in_ch if hidden is None else hidden
        out_hw = tuple(self.depthwise.out_size(s, kernel) for s in in_hw)
        parts = [self.depthwise.cost(mid, None, kernel, out_hw), self.project.cost(mid, out_channels, 1, out_hw)]
        if hidden is not None:
            parts.append(self.expand.cost(in_ch, hidden, 1, in_hw))
        if se_mid:
            parts += [conv_cost(mid, se_mid, 1, (1, 1), bias=True, bn=False),
                      conv_cost(se_mid, mid, 1, (1, 1), bias=True, bn=False)]
        return add_costs(*parts)


# ---- classifier head ----------------------------------------------------------------------------
def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C): global average pooling as one `mean` (ONNX: one ReduceMean)."""
    return x.mean(dim=(2, 3))


def classify(x: torch.Tensor, norm: nn.Module, pool: Callable[[torch.Tensor], torch.Tensor], fc: nn.Module,
             fc_dist: nn.Module | None = None) -> torch.Tensor:
    """Norm, pool, linear; with a distillation linear the two are averaged (timm's DeiT / EfficientFormer
    heads). A family's dynamic head and the static `ClassifierHead` both run this."""
    x = pool(norm(x))
    return fc(x) if fc_dist is None else (fc(x) + fc_dist(x)) / 2


class ClassifierHead(nn.Module):
    """Static head of an extracted subnet: `classify` over plain norm and linear layers."""

    def __init__(self, norm: nn.Module, pool: Callable[[torch.Tensor], torch.Tensor], fc: nn.Linear,
                 fc_dist: nn.Linear | None = None):
        super().__init__()
        self.norm, self.pool, self.fc, self.fc_dist = norm, pool, fc, fc_dist

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return classify(x, self.norm, self.pool, self.fc, self.fc_dist)
