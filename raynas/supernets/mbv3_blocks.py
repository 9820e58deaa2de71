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

from raynas.nn.dynamic import DynamicConv2d, DynamicLinear
from raynas.nn.layers import (
    DynamicConvNormAct,
    DynamicInvertedResidual,
    act_fn,
    act_layer,
    add_costs,
    conv_cost,
    conv_out_size,
)

ACTIVATIONS = ("relu", "hswish")  # the activations a MobileNetV3 space may declare


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
        return conv_out_size(self.in_hw, self.kernel, self.stride)

    def choice(self) -> dict:
        """The block's arguments of `DynamicInvertedResidual` forward / static (after the input)."""
        return {"out_channels": self.out_ch, "hidden": self.hidden if self.has_expand else None,
                "kernel": self.kernel, "residual": self.residual, "se_mid": self.se_mid}

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


# ---- elastic pieces (the inverted-residual block is the shared `raynas.nn.layers` one) ---------------
class DynamicStem(DynamicConvNormAct):
    """First strided conv + BN + act, then the fixed first block (only its width is elastic)."""

    def __init__(self, in_ch: int, max_channels: int, kernel: int, stride: int, act: str,
                 first_block: DynamicInvertedResidual):
        super().__init__(in_ch, max_channels, kernel, stride, act=act)
        self.first_block = first_block

    def forward(self, x: torch.Tensor, p: StemPlan) -> torch.Tensor:
        return self.first_block(super().forward(x, p.channels), **p.first_block.choice())

    @torch.no_grad()
    def static(self, p: StemPlan) -> nn.Sequential:
        return nn.Sequential(super().static(p.in_ch, p.channels),
                             self.first_block.static(p.channels, **p.first_block.choice()))

    def cost(self, p: StemPlan) -> tuple[int, int]:
        hw = conv_out_size(p.in_hw, p.kernel, p.stride)
        return add_costs(super().cost(p.in_ch, p.channels, p.kernel, (hw, hw)),
                         block_cost(self.first_block, p.first_block))


def block_cost(block: DynamicInvertedResidual, p: BlockPlan) -> tuple[int, int]:
    return block.cost(p.in_ch, p.out_ch, p.hidden if p.has_expand else None, p.kernel, (p.in_hw, p.in_hw), p.se_mid)


class DynamicHead(nn.Module):
    """OFA MobileNetV3 head: final expand conv+BN+act, global pool, feature-mix conv+act, classifier."""

    def __init__(self, max_in: int, max_expand: int, max_features: int, num_classes: int, act: str,
                 dropout: float):
        super().__init__()
        self.expand = DynamicConvNormAct(max_in, max_expand, 1, act=act)
        self.mix_conv = DynamicConv2d(max_expand, max_features, 1)
        self.act = act
        self.dropout = nn.Dropout(dropout)
        self.classifier = DynamicLinear(max_features, num_classes)

    def forward(self, x: torch.Tensor, p: HeadPlan) -> torch.Tensor:
        h = act_fn(self.act)(self.mix_conv(F.adaptive_avg_pool2d(self.expand(x, p.expand_ch), 1), p.features))
        return self.classifier(self.dropout(torch.flatten(h, 1)))

    @torch.no_grad()
    def static(self, p: HeadPlan) -> nn.Sequential:
        return nn.Sequential(
            self.expand.static(p.in_ch, p.expand_ch), nn.AdaptiveAvgPool2d(1),
            self.mix_conv.static(p.expand_ch, p.features), act_layer(p.act), nn.Flatten(1),
            nn.Dropout(self.dropout.p), self.classifier.static(p.features),
        )

    def cost(self, p: HeadPlan) -> tuple[int, int]:
        classifier = (p.features * p.num_classes + p.num_classes, p.features * p.num_classes)
        return add_costs(self.expand.cost(p.in_ch, p.expand_ch, 1, (p.in_hw, p.in_hw)),
                         conv_cost(p.expand_ch, p.features, 1, (1, 1), bn=False), classifier)
