"""Building blocks of the AutoViT supernet: elastic conv pieces, the MobileViT block and the MBPool head.

The conv units and MV2 blocks are the shared elastic layers of `raynas.nn.layers`; what is AutoViT's
own is here. Each dynamic block (`Dynamic*`) slices its largest weights per forward and has a `static(...)`
method returning the plain-PyTorch twin (`MobileVitBlock`, the MBPool head) that holds copies of exactly
the sliced weights. Both twins call the
same functional pieces (`unfold_patches`, `fold_patches`, `patch_size_for`, the shared attention), so
a subnet leaving the supernet computes what the supernet computed.

Structure follows MobileViT v1 (Mehta & Rastegari 2021, timm `MobileVitBlock`): n x n conv ->
1x1 conv -> unfold into patches -> transformer layers -> LayerNorm -> fold -> 1x1 conv -> concat with
the block input -> n x n fusion conv. The head ("MBPool" in AutoViT's Table 1) is MobileViT's
(1x1 conv to the head width, pool, classifier) or, with an expansion, NASViT's MBPool.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from raynas.nn.attention import DynamicTransformerBlock
from raynas.nn.dynamic import DynamicBatchNorm2d, DynamicConv2d, DynamicLayerNorm, DynamicLinear
from raynas.nn.layers import DynamicConvNormAct, DynamicInvertedResidual, act_layer, add_costs, conv_cost

# timm's Block default for ViTs; used by both the layers and the MobileViT block's final norm.
LAYER_NORM_EPS = 1e-6
ACT = "silu"  # MobileViT's activation


def expanded_channels(in_ch: int, expansion: float) -> int:
    return int(round(in_ch * expansion))


def patch_size_for(height: int, width: int, patch: int) -> int:
    """The patch side used on an H x W map: `patch` when it tiles the map, else 1.

    MobileViT interpolates maps that the patch does not tile; at the tiny resolutions raynas tests and
    trains on (32 px: 2x2 and 1x1 maps), falling back to 1x1 patches (plain global attention over all
    pixels) keeps the block well defined without resampling ops. Supernet, extracted module and
    `cost()` all call this one rule.
    """
    if torch.jit.is_tracing():
        # ONNX export traces map sizes as tensors; the rule is then fixed at the example's size, which is
        # right because an exported graph has one resolution (only the batch axis is dynamic).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return patch if bool(height % patch == 0) and bool(width % patch == 0) else 1
    return patch if height % patch == 0 and width % patch == 0 else 1


def unfold_patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * p * p, N, C): one sequence of N patches per pixel position inside a patch."""
    _, c, h, w = x.shape
    nh, nw = h // patch, w // patch
    x = x.reshape(-1, c, nh, patch, nw, patch).permute(0, 3, 5, 2, 4, 1)
    return x.reshape(-1, nh * nw, c)


def fold_patches(x: torch.Tensor, patch: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `unfold_patches`: (B * p * p, N, C) -> (B, C, H, W)."""
    c = x.shape[-1]
    nh, nw = height // patch, width // patch
    x = x.reshape(-1, patch, patch, nh, nw, c).permute(0, 5, 3, 1, 4, 2)
    return x.reshape(-1, c, height, width)


# ---- conv pieces ----------------------------------------------------------------------------------
def conv_bn_silu(max_in: int, max_out: int, kernel: int = 1, stride: int = 1) -> DynamicConvNormAct:
    """MobileViT's conv unit: conv (no bias) -> BatchNorm -> SiLU."""
    return DynamicConvNormAct(max_in, max_out, kernel, stride, act=ACT)


def mbconv(max_in: int, max_out: int, max_expansion: float, max_kernel: int, stride: int) -> DynamicInvertedResidual:
    """An MV2 block; expansion 1 has no expand conv (MobileNetV2's t = 1 block)."""
    return DynamicInvertedResidual(max_in, max_out, expanded_channels(max_in, max_expansion), max_kernel, stride,
                                   ACT, has_expand=max_expansion != 1)


def mbconv_choice(in_ch: int, out_ch: int, expansion: float, stride: int) -> dict:
    """The hidden width and residual of one MV2 choice: the residual is used when the stride is 1 and the
    active input and output widths agree, so it depends on the sampled widths."""
    return {"hidden": None if expansion == 1 else expanded_channels(in_ch, expansion),
            "residual": stride == 1 and in_ch == out_ch}


class DynamicFusionConv(nn.Module):
    """MobileViT's fusion conv over concat(block input, local-global features), elastic in width.

    The weight is stored as (out, 2, in, k, k) so that a width-C subnet takes the first C input
    channels of *each* half: channel i of the block input always meets the same weights whatever the
    width (a plain prefix of a 2*C_max input axis would mix the halves), and a smaller supernet can
    inherit it by prefix slicing.
    """

    def __init__(self, max_ch: int, kernel: int):
        super().__init__()
        self.max_ch, self.kernel = max_ch, kernel
        weight = torch.empty(max_ch, 2 * max_ch, kernel, kernel)
        nn.init.kaiming_normal_(weight, mode="fan_out")
        self.weight = nn.Parameter(weight.reshape(max_ch, 2, max_ch, kernel, kernel))

    def active_weight(self, ch: int) -> torch.Tensor:
        if ch > self.max_ch:
            raise ValueError(f"DynamicFusionConv: {ch} channels > {self.max_ch}")
        return self.weight[:ch, :, :ch].reshape(ch, 2 * ch, self.kernel, self.kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.active_weight(x.shape[1] // 2), None, 1, self.kernel // 2)

    @torch.no_grad()
    def static(self, ch: int) -> nn.Conv2d:
        conv = nn.Conv2d(2 * ch, ch, self.kernel, 1, self.kernel // 2, bias=False)
        conv.weight.copy_(self.active_weight(ch))
        return conv


# ---- MobileViT block ------------------------------------------------------------------------------
class MobileVitBlock(nn.Module):
    """Static MobileViT block (timm `MobileVitBlock` layout, patch rule from `patch_size_for`)."""

    def __init__(self, conv_kxk: nn.Module, conv_1x1: nn.Conv2d, transformer: nn.Sequential,
                 norm: nn.LayerNorm, conv_proj: nn.Module, conv_fusion: nn.Module, patch_size: int):
        super().__init__()
        self.conv_kxk, self.conv_1x1 = conv_kxk, conv_1x1
        self.transformer, self.norm = transformer, norm
        self.conv_proj, self.conv_fusion = conv_proj, conv_fusion
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        y = self.conv_1x1(self.conv_kxk(x))
        h, w = y.shape[-2:]
        p = patch_size_for(h, w, self.patch_size)
        tokens = self.norm(self.transformer(unfold_patches(y, p)))
        y = self.conv_proj(fold_patches(tokens, p, h, w))
        return self.conv_fusion(torch.cat((shortcut, y), dim=1))


class DynamicMobileVitBlock(nn.Module):
    """Elastic MobileViT block: width (from the input), number of transformer layers, heads, MLP width.

    The transformer width equals the block width (AutoViT's "width" is the CNN channel count and
    the transformer hidden dimension alike); attention uses `heads x head_dim` q/k/v channels.
    """

    def __init__(self, max_ch: int, max_depth: int, max_heads: int, max_hidden: int, head_dim: int,
                 kernel: int, patch_size: int):
        super().__init__()
        self.patch_size, self.head_dim = patch_size, head_dim
        self.conv_kxk = conv_bn_silu(max_ch, max_ch, kernel)
        self.conv_1x1 = DynamicConv2d(max_ch, max_ch, 1)
        self.layers = nn.ModuleList(
            DynamicTransformerBlock(max_ch, max_heads, max_hidden, head_dim, norm_eps=LAYER_NORM_EPS)
            for _ in range(max_depth)
        )
        self.norm = DynamicLayerNorm(max_ch, eps=LAYER_NORM_EPS)
        self.conv_proj = conv_bn_silu(max_ch, max_ch, 1)
        self.fusion = DynamicFusionConv(max_ch, kernel)
        self.fusion_bn = DynamicBatchNorm2d(max_ch)
        self.fusion_act = act_layer(ACT)

    def forward(self, x: torch.Tensor, depth: int, heads: int, hidden: int) -> torch.Tensor:
        c = x.shape[1]
        shortcut = x
        y = self.conv_1x1(self.conv_kxk(x, c), c)
        h, w = y.shape[-2:]
        p = patch_size_for(h, w, self.patch_size)
        tokens = unfold_patches(y, p)
        for layer in self.layers[:depth]:
            tokens = layer(tokens, heads, hidden)
        y = self.conv_proj(fold_patches(self.norm(tokens), p, h, w), c)
        return self.fusion_act(self.fusion_bn(self.fusion(torch.cat((shortcut, y), dim=1))))

    def cost(self, ch: int, depth: int, heads: int, hidden: int, hw: tuple[int, int]) -> tuple[int, int]:
        """(params, MACs) of `static(ch, depth, heads, hidden)` on an `hw` map (the block keeps its size)."""
        k, head_dim = self.fusion.kernel, self.head_dim
        tokens = hw[0] * hw[1]
        p = patch_size_for(hw[0], hw[1], self.patch_size)
        n = tokens // (p * p)  # sequence length; p * p sequences
        inner = heads * head_dim
        per_layer_params = (4 * ch  # two LayerNorms
                            + ch * 3 * inner + 3 * inner + inner * ch + ch  # qkv, proj
                            + ch * hidden + hidden + hidden * ch + ch)  # MLP
        per_layer_macs = tokens * (ch * 3 * inner + inner * ch + 2 * ch * hidden) \
            + 2 * p * p * heads * n * n * head_dim  # q @ k^T and attn @ v
        return add_costs(
            conv_cost(ch, ch, k, hw),  # local representation
            conv_cost(ch, ch, 1, hw, bn=False),  # projection to the transformer width
            (depth * per_layer_params + 2 * ch, depth * per_layer_macs),  # + the final LayerNorm
            conv_cost(ch, ch, 1, hw),  # back-projection
            conv_cost(2 * ch, ch, k, hw),  # fusion of concat(input, global features)
        )

    @torch.no_grad()
    def static(self, ch: int, depth: int, heads: int, hidden: int) -> MobileVitBlock:
        transformer = nn.Sequential(*(layer.static(ch, heads, hidden) for layer in self.layers[:depth]))
        fusion = nn.Sequential(self.fusion.static(ch), self.fusion_bn.static(ch), act_layer(ACT))
        return MobileVitBlock(self.conv_kxk.static(ch, ch), self.conv_1x1.static(ch, ch), transformer,
                              self.norm.static(ch), self.conv_proj.static(ch, ch), fusion, self.patch_size)


# ---- MBPool head ----------------------------------------------------------------------------------
class DynamicMBPoolHead(nn.Module):
    """The classifier head, elastic in input width and head width.

    `expansion=None` (the built-in spaces): MobileViT's head, a 1x1 conv to the head width + BN + SiLU,
    global average pool, linear classifier. `expansion=e`: NASViT's MBPool (AttentiveNAS v3 head),
    1x1 expand to e x the input width + BN + SiLU, pool, bias-free feature mix to the head width + SiLU,
    linear classifier.
    """

    def __init__(self, max_in: int, expansion: float | None, max_width: int, num_classes: int):
        super().__init__()
        self.expansion = expansion
        if expansion is None:
            self.expand = conv_bn_silu(max_in, max_width, 1)
            self.feature_mix = None
        else:
            self.expand = conv_bn_silu(max_in, expanded_channels(max_in, expansion), 1)
            self.feature_mix = DynamicLinear(expanded_channels(max_in, expansion), max_width, bias=False)
        self.classifier = DynamicLinear(max_width, num_classes)
        self.act = act_layer(ACT)

    def expanded(self, in_ch: int, width: int) -> int:
        return width if self.expansion is None else expanded_channels(in_ch, self.expansion)

    def forward(self, x: torch.Tensor, width: int) -> torch.Tensor:
        x = self.expand(x, self.expanded(x.shape[1], width)).mean(dim=(2, 3))
        if self.feature_mix is not None:
            x = self.act(self.feature_mix(x, width))
        return self.classifier(x)

    def cost(self, in_ch: int, width: int, hw: tuple[int, int]) -> tuple[int, int]:
        mid = self.expanded(in_ch, width)
        classes = self.classifier.max_out
        mix = 0 if self.feature_mix is None else mid * width  # bias-free feature mix (NASViT MBPool)
        expand = self.expand.cost(in_ch, mid, 1, hw)
        return add_costs(expand, (mix + width * classes + classes, mix + width * classes))

    @torch.no_grad()
    def static(self, in_ch: int, width: int) -> nn.Sequential:
        mid = self.expanded(in_ch, width)
        layers = [self.expand.static(in_ch, mid), GlobalAvgPool()]
        if self.feature_mix is not None:
            layers += [self.feature_mix.static(mid, width), act_layer(ACT)]
        return nn.Sequential(*layers, self.classifier.static(width))


class GlobalAvgPool(nn.Module):
    """(B, C, H, W) -> (B, C); the same `mean` the supernet uses (ONNX: one ReduceMean)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))
