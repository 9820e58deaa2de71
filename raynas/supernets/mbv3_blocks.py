"""MobileNetV3 pieces for the `mbv3` family: resolved layer plans, their exact cost, and the
elastic (weight-entangled) and static versions of stem, inverted-residual block and head.

A `BlockPlan` is one inverted-residual block with every size resolved (channels, kernel, stride,
SE width, input size). The supernet's forward pass, its extraction and its analytic cost all read
the same plans, so the three cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raynas.nn.dynamic import DynamicBatchNorm2d, DynamicConv2d, DynamicLinear

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "hswish": nn.Hardswish}


def make_activation(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


def conv_out(size: int, stride: int) -> int:
    """Spatial size after a 'same'-padded odd-kernel conv: ceil(size / stride)."""
    return (size - 1) // stride + 1


# ---- resolved plans ---------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockPlan:
    """One inverted-residual block with all sizes resolved. `se_mid == 0` means no squeeze-excite.

    `has_expand` says whether the block owns an expansion conv: a searched block does (OFA keeps the
    1x1 conv at expansion 1, as a square in_ch -> in_ch conv, so the depthwise weights it shares with
    expansions 2..6 always read an expanded representation); only a block fixed at expansion 1, such
    as MobileNetV3's first block, has none and feeds its input straight to the depthwise conv."""

    in_ch: int
    out_ch: int
    expand: int
    kernel: int
    stride: int
    se_mid: int
    act: str
    residual: bool
    in_hw: int
    has_expand: bool = True

    @property
    def hidden(self) -> int:
        return self.in_ch * self.expand

    @property
    def out_hw(self) -> int:
        return conv_out(self.in_hw, self.stride)

    @property
    def key(self) -> str:
        se = f"se{self.se_mid}" if self.se_mid else "nose"
        res = "res" if self.residual else "nores"
        expand = f"e{self.expand}" if self.has_expand else "noexp"
        return (f"mbv3.ir:in{self.in_ch}x{self.in_hw}x{self.in_hw}:{expand}:k{self.kernel}"
                f":s{self.stride}:out{self.out_ch}:{se}:{self.act}:{res}")


@dataclass(frozen=True)
class StemPlan:
    """First conv (+BN+act) followed by the fixed first inverted-residual block."""

    in_ch: int
    channels: int
    kernel: int
    stride: int
    act: str
    in_hw: int
    first_block: BlockPlan

    @property
    def out_hw(self) -> int:
        return self.first_block.out_hw

    @property
    def key(self) -> str:
        return (f"mbv3.stem:in{self.in_ch}x{self.in_hw}x{self.in_hw}:c{self.channels}:k{self.kernel}"
                f":s{self.stride}:{self.act}|{self.first_block.key}")


@dataclass(frozen=True)
class HeadPlan:
    """1x1 expand conv (+BN+act), global pool, 1x1 feature-mix conv (+act, no BN), classifier."""

    in_ch: int
    expand_ch: int
    features: int
    num_classes: int
    act: str
    in_hw: int

    @property
    def key(self) -> str:
        return (f"mbv3.head:in{self.in_ch}x{self.in_hw}x{self.in_hw}:e{self.expand_ch}:f{self.features}"
                f":{self.act}:n{self.num_classes}")


# ---- exact cost (what FlopCounterMode // 2 and parameter counting give) --------------------------
def _conv(cin: int, cout: int, k: int, out_hw: int, groups: int = 1, bias: bool = False) -> tuple[int, int]:
    weights = cout * (cin // groups) * k * k
    return weights + (cout if bias else 0), weights * out_hw * out_hw


def block_cost(p: BlockPlan) -> tuple[int, int]:
    params = macs = 0
    parts = []
    if p.has_expand:
        parts.append(_conv(p.in_ch, p.hidden, 1, p.in_hw))
        params += 2 * p.hidden  # BN affine
    parts.append(_conv(p.hidden, p.hidden, p.kernel, p.out_hw, groups=p.hidden))
    params += 2 * p.hidden
    if p.se_mid:
        parts.append(_conv(p.hidden, p.se_mid, 1, 1, bias=True))
        parts.append(_conv(p.se_mid, p.hidden, 1, 1, bias=True))
    parts.append(_conv(p.hidden, p.out_ch, 1, p.out_hw))
    params += 2 * p.out_ch
    return params + sum(a for a, _ in parts), macs + sum(b for _, b in parts)


def stem_cost(p: StemPlan) -> tuple[int, int]:
    out_hw = conv_out(p.in_hw, p.stride)
    params, macs = _conv(p.in_ch, p.channels, p.kernel, out_hw)
    bp, bm = block_cost(p.first_block)
    return params + 2 * p.channels + bp, macs + bm


def head_cost(p: HeadPlan) -> tuple[int, int]:
    ep, em = _conv(p.in_ch, p.expand_ch, 1, p.in_hw)
    mp, mm = _conv(p.expand_ch, p.features, 1, 1)
    cls_params = p.features * p.num_classes + p.num_classes
    return ep + 2 * p.expand_ch + mp + cls_params, em + mm + p.features * p.num_classes


# ---- static pieces (plain PyTorch; what an extracted subnet is made of) -----------------------
class InputResize(nn.Module):
    """Bilinear resize of the input to the arch's resolution (BigNAS-style: the subnet owns it)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_input(x, self.size)


def resize_input(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


class SqueezeExcite(nn.Module):
    """MobileNetV3 SE: global pool, 1x1 reduce + ReLU, 1x1 expand + hard-sigmoid gate."""

    def __init__(self, channels: int, mid: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, mid, 1, bias=True)
        self.expand = nn.Conv2d(mid, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))
        return x * F.hardsigmoid(self.expand(s))


class InvertedResidual(nn.Module):
    """expand 1x1 (optional) -> depthwise kxk -> SE (optional) -> project 1x1, plus identity skip."""

    def __init__(self, expand: nn.Module, depthwise: nn.Module, se: nn.Module, project: nn.Module,
                 residual: bool):
        super().__init__()
        self.expand, self.depthwise, self.se, self.project = expand, depthwise, se, project
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.project(self.se(self.depthwise(self.expand(x))))
        return h + x if self.residual else h


# ---- elastic pieces ----------------------------------------------------------------------------
class DynamicSqueezeExcite(nn.Module):
    def __init__(self, max_channels: int, max_mid: int):
        super().__init__()
        self.reduce = DynamicConv2d(max_channels, max_mid, 1, bias=True)
        self.expand = DynamicConv2d(max_mid, max_channels, 1, bias=True)

    def forward(self, x: torch.Tensor, mid: int) -> torch.Tensor:
        s = F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1), mid))
        return x * F.hardsigmoid(self.expand(s, x.shape[1]))

    def static(self, channels: int, mid: int) -> SqueezeExcite:
        se = SqueezeExcite(channels, mid)
        se.reduce = self.reduce.static(channels, mid)
        se.expand = self.expand.static(mid, channels)
        return se


class DynamicInvertedResidual(nn.Module):
    """Inverted-residual block whose expansion, kernel, in/out width are chosen per forward.

    Every choice slices the one largest weight (OFA weight entanglement: smaller kernels are the
    centre of the largest, fewer channels are a prefix). A block built without an expand conv (its
    only expansion is 1, as MobileNetV3's first block) feeds its input to the depthwise conv directly.
    """

    def __init__(self, max_in: int, max_out: int, max_hidden: int, max_kernel: int, stride: int,
                 max_se_mid: int, act: str, has_expand: bool):
        super().__init__()
        self.stride = stride
        self.act = make_activation(act)
        if has_expand:
            self.expand_conv = DynamicConv2d(max_in, max_hidden, 1)
            self.expand_bn = DynamicBatchNorm2d(max_hidden)
        self.dw_conv = DynamicConv2d(max_hidden, max_hidden, max_kernel, stride, depthwise=True)
        self.dw_bn = DynamicBatchNorm2d(max_hidden)
        self.se = DynamicSqueezeExcite(max_hidden, max_se_mid) if max_se_mid else None
        self.project_conv = DynamicConv2d(max_hidden, max_out, 1)
        self.project_bn = DynamicBatchNorm2d(max_out)

    def forward(self, x: torch.Tensor, p: BlockPlan) -> torch.Tensor:
        h = x
        if p.has_expand:
            h = self.act(self.expand_bn(self.expand_conv(h, p.hidden)))
        h = self.act(self.dw_bn(self.dw_conv(h, kernel_size=p.kernel)))
        if p.se_mid:
            h = self.se(h, p.se_mid)
        h = self.project_bn(self.project_conv(h, p.out_ch))
        return h + x if p.residual else h

    @torch.no_grad()
    def static(self, p: BlockPlan) -> InvertedResidual:
        expand: nn.Module = nn.Identity()
        if p.has_expand:
            expand = nn.Sequential(self.expand_conv.static(p.in_ch, p.hidden), self.expand_bn.static(p.hidden),
                                   make_activation(p.act))
        depthwise = nn.Sequential(self.dw_conv.static(p.hidden, kernel_size=p.kernel),
                                  self.dw_bn.static(p.hidden), make_activation(p.act))
        se = self.se.static(p.hidden, p.se_mid) if p.se_mid else nn.Identity()
        project = nn.Sequential(self.project_conv.static(p.hidden, p.out_ch), self.project_bn.static(p.out_ch))
        return InvertedResidual(expand, depthwise, se, project, p.residual)


class DynamicStem(nn.Module):
    """First strided conv + BN + act, then the fixed first block (only its width is elastic)."""

    def __init__(self, in_ch: int, max_channels: int, kernel: int, stride: int, act: str,
                 first_block: DynamicInvertedResidual):
        super().__init__()
        self.conv = DynamicConv2d(in_ch, max_channels, kernel, stride)
        self.bn = DynamicBatchNorm2d(max_channels)
        self.act = make_activation(act)
        self.first_block = first_block

    def forward(self, x: torch.Tensor, p: StemPlan) -> torch.Tensor:
        return self.first_block(self.act(self.bn(self.conv(x, p.channels))), p.first_block)

    @torch.no_grad()
    def static(self, p: StemPlan) -> nn.Sequential:
        return nn.Sequential(self.conv.static(p.in_ch, p.channels), self.bn.static(p.channels),
                             make_activation(p.act), self.first_block.static(p.first_block))


class DynamicHead(nn.Module):
    """OFA MobileNetV3 head: final expand conv+BN+act, global pool, feature-mix conv+act, classifier."""

    def __init__(self, max_in: int, max_expand: int, max_features: int, num_classes: int, act: str,
                 dropout: float):
        super().__init__()
        self.expand_conv = DynamicConv2d(max_in, max_expand, 1)
        self.expand_bn = DynamicBatchNorm2d(max_expand)
        self.mix_conv = DynamicConv2d(max_expand, max_features, 1)
        self.act = make_activation(act)
        self.dropout = nn.Dropout(dropout)
        self.classifier = DynamicLinear(max_features, num_classes)

    def forward(self, x: torch.Tensor, p: HeadPlan) -> torch.Tensor:
        h = self.act(self.expand_bn(self.expand_conv(x, p.expand_ch)))
        h = self.act(self.mix_conv(F.adaptive_avg_pool2d(h, 1), p.features))
        return self.classifier(self.dropout(torch.flatten(h, 1)))

    @torch.no_grad()
    def static(self, p: HeadPlan) -> nn.Sequential:
        return nn.Sequential(
            self.expand_conv.static(p.in_ch, p.expand_ch), self.expand_bn.static(p.expand_ch),
            make_activation(p.act), nn.AdaptiveAvgPool2d(1), self.mix_conv.static(p.expand_ch, p.features),
            make_activation(p.act), nn.Flatten(1), nn.Dropout(self.dropout.p),
            self.classifier.static(p.features),
        )
