"""Elastic EfficientFormerV2 pieces for the SCAN-Edge supernet, with their static twins and exact costs.

Every dynamic piece (`Dynamic*` below) is one sequential part of a subnet and offers three views of the
same choice (`**choices` are the piece's searched values, `shape` its (C, H, W) input):

* `forward(x, **choices)`  the weight-entangled computation (largest weight, sliced);
* `static(shape, **choices)`  a plain-torch module holding copies of exactly the sliced weights;
* `cost(shape, **choices)`  analytic (params, MACs) of that static module, and `out_shape(...)`.

The structure follows timm's `efficientformer_v2.py` (ConvNorm = conv with bias + BatchNorm, the
FFN's depthwise "mid conv", `Attention2d` with talking heads / local V / strided attention in stage 3,
`Attention2dDownsample` with the local-global query for the last embedding, LayerScale on every
residual branch, BatchNorm + linear (+ distillation linear) head).

Two deliberate differences from timm, both invisible in the cost:
* V channels are laid out dim-major (channel = i * heads + head) instead of head-major, so that a
  smaller V expansion is a prefix slice of one weight and still keeps the first dims of *every*
  head (SCAN-Edge keeps Q/K fixed and searches the V expansion only).
* The attention-bias table is stored as (heads, H, W) over |dy|, |dx| offsets (timm stores the same
  numbers flattened to (heads, H*W)); a smaller input uses the sub-table of its offsets, a larger
  one clamps offsets to the farthest learned one, so any resolution works.

MACs count what `raynas.supernets.counting` counts: conv, linear and matmul; not norms,
activations, pooling, interpolation or elementwise ops.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from timm.layers import LayerScale2d
from torch import nn

from raynas.nn.dynamic import DynamicBatchNorm2d, DynamicConv2d, DynamicLinear
from raynas.nn.layers import (
    ClassifierHead,
    DynamicConvNormAct,
    act_fn,
    act_layer,
    add_costs,
    classify,
    conv_cost,
    conv_out_size,
    spatial_mean,
)

Shape = tuple[int, int, int]  # (C, H, W) at batch 1


# ---- shared elementary pieces ----------------------------------------------------------------------
def conv_norm(max_in: int, max_out: int, max_kernel: int = 1, stride: int = 1,
              depthwise: bool = False) -> DynamicConvNormAct:
    """EfficientFormerV2's ConvNorm: conv with bias, then BatchNorm (the activation is searched: per call)."""
    return DynamicConvNormAct(max_in, max_out, max_kernel, stride, depthwise=depthwise, bias=True)


class DynamicLayerScale2d(nn.Module):
    """Per-channel residual-branch scale (timm LayerScale2d), sliced to the active width."""

    def __init__(self, max_ch: int, init_values: float):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((max_ch,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma[: x.shape[1]].view(1, -1, 1, 1)

    @torch.no_grad()
    def static(self, ch: int) -> LayerScale2d:
        ls = LayerScale2d(ch, self.init_values)
        ls.gamma.copy_(self.gamma[:ch])
        return ls


class Residual(nn.Module):
    """x + branch(x): one FFN or MHSA block of an extracted subnet."""

    def __init__(self, branch: nn.Module):
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


# ---- stem and convolutional embedding ----------------------------------------------------------------
class DynamicStem(nn.Module):
    """timm Stem4: two 3x3 stride-2 ConvNormAct, the first at half the stem width."""

    def __init__(self, in_ch: int, max_width: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.conv1 = conv_norm(in_ch, max_width // 2, kernel, stride=2)
        self.conv2 = conv_norm(max_width // 2, max_width, kernel, stride=2)

    def forward(self, x: torch.Tensor, width: int, act: str) -> torch.Tensor:
        return self.conv2(self.conv1(x, width // 2, act=act), width, act=act)

    def static(self, shape: Shape, width: int, act: str) -> nn.Module:
        return nn.Sequential(OrderedDict(conv1=self.conv1.static(shape[0], width // 2, act=act),
                                         conv2=self.conv2.static(width // 2, width, act=act)))

    def out_shape(self, shape: Shape, width: int, act: str) -> Shape:
        h, w = (conv_out_size(conv_out_size(s, self.kernel, 2), self.kernel, 2) for s in shape[1:])
        return width, h, w

    def cost(self, shape: Shape, width: int, act: str) -> tuple[int, int]:
        hw1 = tuple(conv_out_size(s, self.kernel, 2) for s in shape[1:])
        _, h, w = self.out_shape(shape, width, act)
        return add_costs(self.conv1.cost(shape[0], width // 2, self.kernel, hw1),
                    self.conv2.cost(width // 2, width, self.kernel, (h, w)))


class DynamicConvEmbedding(nn.Module):
    """timm Downsample without attention: one 3x3 stride-2 ConvNorm that also sets the next width."""

    def __init__(self, max_in: int, max_out: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.conv = conv_norm(max_in, max_out, kernel, stride=2)

    def forward(self, x: torch.Tensor, width: int) -> torch.Tensor:
        return self.conv(x, width)

    def static(self, shape: Shape, width: int) -> nn.Module:
        return self.conv.static(shape[0], width)

    def out_shape(self, shape: Shape, width: int) -> Shape:
        return (width, *(conv_out_size(s, self.kernel, 2) for s in shape[1:]))

    def cost(self, shape: Shape, width: int) -> tuple[int, int]:
        return self.conv.cost(shape[0], width, self.kernel, self.out_shape(shape, width)[1:])


# ---- dual FFN ------------------------------------------------------------------------------------
def ffn_hidden(width: int, expansion: float) -> int:
    """Hidden width of an FFN, truncated as timm's `int(dim * mlp_ratio)`."""
    return int(width * expansion)


class DynamicUnifiedFFN(nn.Module):
    """timm ConvMlpWithNorm(mid_conv=True): 1x1 expand, KxK depthwise mid conv, 1x1 project."""

    def __init__(self, max_dim: int, max_hidden: int, max_kernel: int, ls_init: float):
        super().__init__()
        self.fc1 = conv_norm(max_dim, max_hidden, 1)
        self.mid = conv_norm(max_hidden, max_hidden, max_kernel, depthwise=True)
        self.fc2 = conv_norm(max_hidden, max_dim, 1)
        self.ls = DynamicLayerScale2d(max_dim, ls_init)

    def forward(self, x: torch.Tensor, hidden: int, kernel: int, act: str) -> torch.Tensor:
        y = self.mid(self.fc1(x, hidden, act=act), kernel=kernel, act=act)
        return self.ls(self.fc2(y, x.shape[1]))

    def static(self, dim: int, hidden: int, kernel: int, act: str) -> nn.Module:
        return nn.Sequential(OrderedDict(
            fc1=self.fc1.static(dim, hidden, act=act),
            mid=self.mid.static(hidden, kernel=kernel, act=act),
            fc2=self.fc2.static(hidden, dim),
            ls=self.ls.static(dim),
        ))

    def cost(self, dim: int, hw: tuple[int, int], hidden: int, kernel: int) -> tuple[int, int]:
        return add_costs(self.fc1.cost(dim, hidden, 1, hw), self.mid.cost(hidden, None, kernel, hw),
                    self.fc2.cost(hidden, dim, 1, hw), (dim, 0))


class DynamicFusedFFN(nn.Module):
    """Fused FFN (SCAN-Edge): one KxK conv replaces the 1x1 expansion + depthwise conv; 1x1 project."""

    def __init__(self, max_dim: int, max_hidden: int, max_kernel: int, ls_init: float):
        super().__init__()
        self.fc1 = conv_norm(max_dim, max_hidden, max_kernel)
        self.fc2 = conv_norm(max_hidden, max_dim, 1)
        self.ls = DynamicLayerScale2d(max_dim, ls_init)

    def forward(self, x: torch.Tensor, hidden: int, kernel: int, act: str) -> torch.Tensor:
        y = self.fc1(x, hidden, kernel, act=act)
        return self.ls(self.fc2(y, x.shape[1]))

    def static(self, dim: int, hidden: int, kernel: int, act: str) -> nn.Module:
        return nn.Sequential(OrderedDict(
            fc1=self.fc1.static(dim, hidden, kernel, act=act),
            fc2=self.fc2.static(hidden, dim),
            ls=self.ls.static(dim),
        ))

    def cost(self, dim: int, hw: tuple[int, int], hidden: int, kernel: int) -> tuple[int, int]:
        return add_costs(self.fc1.cost(dim, hidden, kernel, hw), self.fc2.cost(hidden, dim, 1, hw), (dim, 0))


FFN_TYPES = {"unified": DynamicUnifiedFFN, "fused": DynamicFusedFFN}


class DynamicDualFFN(nn.Module):
    """Dual FFN (SCAN-Edge App. B): a separate weight set per FFN type, one active per block."""

    def __init__(self, ffn_types: tuple[str, ...], max_dim: int, max_hidden: int, max_kernel: int,
                 ls_init: float):
        super().__init__()
        self.ffns = nn.ModuleDict({t: FFN_TYPES[t](max_dim, max_hidden, max_kernel, ls_init) for t in ffn_types})

    def forward(self, x: torch.Tensor, ffn: str, expansion: float, kernel: int, act: str) -> torch.Tensor:
        return x + self.ffns[ffn](x, ffn_hidden(x.shape[1], expansion), kernel, act)

    def static(self, shape: Shape, ffn: str, expansion: float, kernel: int, act: str) -> nn.Module:
        return Residual(self.ffns[ffn].static(shape[0], ffn_hidden(shape[0], expansion), kernel, act))

    def out_shape(self, shape: Shape, **_) -> Shape:
        return shape

    def cost(self, shape: Shape, ffn: str, expansion: float, kernel: int, act: str) -> tuple[int, int]:
        return self.ffns[ffn].cost(shape[0], shape[1:], ffn_hidden(shape[0], expansion), kernel)


# ---- attention -----------------------------------------------------------------------------------
def relative_bias_index(table_hw: tuple[int, int], q_grid: tuple[int, int], k_grid: tuple[int, int],
                        q_step: int) -> torch.Tensor:
    """(Nq, Nk) indices into a (th * tw) bias table for offsets |dy|, |dx| between queries and keys.

    Queries sit on every `q_step`-th key position (the downsampling attention's strided queries).
    Offsets beyond the table reuse its farthest entry, so inputs larger than the built resolution work.
    """
    th, tw = table_hw
    ky, kx = torch.meshgrid(torch.arange(k_grid[0]), torch.arange(k_grid[1]), indexing="ij")
    qy, qx = torch.meshgrid(torch.arange(q_grid[0]) * q_step, torch.arange(q_grid[1]) * q_step, indexing="ij")
    dy = (qy.reshape(-1, 1) - ky.reshape(1, -1)).abs().clamp(max=th - 1)
    dx = (qx.reshape(-1, 1) - kx.reshape(1, -1)).abs().clamp(max=tw - 1)
    return dy * tw + dx


def active_table_hw(table: torch.Tensor, k_grid: tuple[int, int]) -> tuple[int, int]:
    return min(table.shape[1], k_grid[0]), min(table.shape[2], k_grid[1])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, heads: int, key_dim: int,
           talking_head1: nn.Module | None = None, talking_head2: nn.Module | None = None) -> torch.Tensor:
    """Multi-head attention of conv feature maps (timm Attention2d / Attention2dDownsample core).

    q: (B, heads*key_dim, hq, wq), k: (B, heads*key_dim, hk, wk) head-major; v: (B, d*heads, hk, wk)
    dim-major; bias: (heads, Nq, Nk). Returns (B, d*heads, hq, wq), dim-major. The dynamic and the
    static modules both call this, so they run the same ops in the same order.
    """
    b, _, hq, wq = q.shape
    nq, nk = hq * wq, k.shape[2] * k.shape[3]
    d = v.shape[1] // heads
    q = q.reshape(b, heads, key_dim, nq).transpose(2, 3)
    k = k.reshape(b, heads, key_dim, nk)
    v = v.reshape(b, d, heads, nk).permute(0, 2, 3, 1)
    attn = (q @ k) * key_dim**-0.5 + bias
    if talking_head1 is not None:
        attn = talking_head1(attn)
    attn = attn.softmax(dim=-1)
    if talking_head2 is not None:
        attn = talking_head2(attn)
    return (attn @ v).permute(0, 3, 1, 2).reshape(b, d * heads, hq, wq)


def _bias_table(table: torch.Tensor, k_grid: tuple[int, int]) -> torch.Tensor:
    th, tw = active_table_hw(table, k_grid)
    return table[:, :th, :tw].reshape(table.shape[0], th * tw)


class Attention4d(nn.Module):
    """Static MHSA of an extracted subnet (timm Attention2d with SCAN-Edge's elastic V)."""

    def __init__(self, parts: dict[str, nn.Module | None], table: torch.Tensor, index: torch.Tensor,
                 heads: int, key_dim: int, act: str):
        super().__init__()
        self.stride_conv = parts["stride_conv"]
        self.q, self.k, self.v, self.v_local = parts["q"], parts["k"], parts["v"], parts["v_local"]
        self.talking_head1, self.talking_head2 = parts["talking_head1"], parts["talking_head2"]
        self.act, self.proj = act_layer(act), parts["proj"]
        self.heads, self.key_dim = heads, key_dim
        self.attention_biases = nn.Parameter(table.detach().clone())
        self.register_buffer("attention_bias_idxs", index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = self.stride_conv(x) if self.stride_conv is not None else x
        v = self.v(xs)
        out = attend(self.q(xs), self.k(xs), v, self.attention_biases[:, self.attention_bias_idxs],
                     self.heads, self.key_dim, self.talking_head1, self.talking_head2)
        out = out + self.v_local(v)
        if self.stride_conv is not None:
            out = F.interpolate(out, size=x.shape[2:], mode="bilinear", align_corners=False)
        return self.proj(self.act(out))


class DynamicMHSA(nn.Module):
    """SCAN-Edge MHSA block in stages 3-4: timm Attention2d with searched V expansion and activation.

    Q/K are fixed at heads x key_dim (the attention maps are shared by every subnet); V has
    heads x key_dim x expansion channels. `stride` 2 (stage 3 of EfficientFormerV2) attends on a
    depthwise-strided map and upsamples the result back (bilinear).
    """

    def __init__(self, max_dim: int, heads: int, key_dim: int, max_expansion: int, stride: int,
                 table_size: int, ls_init: float):
        super().__init__()
        self.heads, self.key_dim, self.stride = heads, key_dim, stride
        qk, v_max = heads * key_dim, heads * key_dim * max_expansion
        self.stride_conv = conv_norm(max_dim, max_dim, 3, stride, depthwise=True) if stride > 1 else None
        self.q = conv_norm(max_dim, qk)
        self.k = conv_norm(max_dim, qk)
        self.v = conv_norm(max_dim, v_max)
        self.v_local = conv_norm(v_max, v_max, 3, depthwise=True)
        self.talking_head1 = nn.Conv2d(heads, heads, 1)
        self.talking_head2 = nn.Conv2d(heads, heads, 1)
        self.proj = conv_norm(v_max, max_dim)
        self.ls = DynamicLayerScale2d(max_dim, ls_init)
        self.attention_biases = nn.Parameter(torch.zeros(heads, table_size, table_size))
        self._index_cache: dict[tuple, torch.Tensor] = {}

    def _grid(self, hw: tuple[int, int]) -> tuple[int, int]:
        return tuple(conv_out_size(s, 3, self.stride) for s in hw) if self.stride > 1 else tuple(hw)

    def _index(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        key = (grid, str(device))
        if key not in self._index_cache:
            table_hw = active_table_hw(self.attention_biases, grid)
            self._index_cache[key] = relative_bias_index(table_hw, grid, grid, 1).to(device)
        return self._index_cache[key]

    def forward(self, x: torch.Tensor, expansion: int, act: str) -> torch.Tensor:
        v_ch = self.heads * self.key_dim * expansion
        xs = self.stride_conv(x) if self.stride_conv is not None else x
        grid = tuple(xs.shape[2:])
        bias = _bias_table(self.attention_biases, grid)[:, self._index(grid, x.device)]
        v = self.v(xs, v_ch)
        out = attend(self.q(xs), self.k(xs), v, bias, self.heads, self.key_dim,
                     self.talking_head1, self.talking_head2)
        out = out + self.v_local(v)
        if self.stride_conv is not None:
            out = F.interpolate(out, size=x.shape[2:], mode="bilinear", align_corners=False)
        return x + self.ls(self.proj(act_fn(act)(out), x.shape[1]))

    @torch.no_grad()
    def static(self, shape: Shape, expansion: int, act: str) -> nn.Module:
        dim, v_ch = shape[0], self.heads * self.key_dim * expansion
        grid = self._grid(shape[1:])
        parts = {
            "stride_conv": self.stride_conv.static(dim) if self.stride_conv is not None else None,
            "q": self.q.static(dim), "k": self.k.static(dim), "v": self.v.static(dim, v_ch),
            "v_local": self.v_local.static(v_ch), "proj": self.proj.static(v_ch, dim),
            "talking_head1": copy.deepcopy(self.talking_head1), "talking_head2": copy.deepcopy(self.talking_head2),
        }
        table_hw = active_table_hw(self.attention_biases, grid)
        attn = Attention4d(parts, _bias_table(self.attention_biases, grid),
                           relative_bias_index(table_hw, grid, grid, 1), self.heads, self.key_dim, act)
        return Residual(nn.Sequential(OrderedDict(attn=attn, ls=self.ls.static(dim))))

    def out_shape(self, shape: Shape, **_) -> Shape:
        return shape

    def cost(self, shape: Shape, expansion: int, act: str) -> tuple[int, int]:
        dim, hw = shape[0], shape[1:]
        qk, v_ch = self.heads * self.key_dim, self.heads * self.key_dim * expansion
        grid = self._grid(hw)
        n = grid[0] * grid[1]
        th, tw = active_table_hw(self.attention_biases, grid)
        talking = (self.heads * self.heads + self.heads, self.heads * self.heads * n * n)
        parts = [
            self.q.cost(dim, qk, 1, grid), self.k.cost(dim, qk, 1, grid), self.v.cost(dim, v_ch, 1, grid),
            self.v_local.cost(v_ch, None, 3, grid), talking, talking,
            (0, self.heads * n * n * (self.key_dim + v_ch // self.heads)),  # q @ k and attn @ v
            self.proj.cost(v_ch, dim, 1, hw), (self.heads * th * tw, 0), (dim, 0),  # bias table, layer scale
        ]
        if self.stride_conv is not None:
            parts.append(self.stride_conv.cost(dim, None, 3, grid))
        return add_costs(*parts)


class Attention4dDownsample(nn.Module):
    """Static attention branch of the last embedding (timm Attention2dDownsample, elastic V)."""

    def __init__(self, parts: dict[str, nn.Module], table: torch.Tensor, index: torch.Tensor,
                 heads: int, key_dim: int, act: str):
        super().__init__()
        self.q_local, self.q_pool, self.q_proj = parts["q_local"], nn.AvgPool2d(1, 2, 0), parts["q_proj"]
        self.k, self.v, self.v_local = parts["k"], parts["v"], parts["v_local"]
        self.act, self.proj = act_layer(act), parts["proj"]
        self.heads, self.key_dim = heads, key_dim
        self.attention_biases = nn.Parameter(table.detach().clone())
        self.register_buffer("attention_bias_idxs", index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(self.q_local(x) + self.q_pool(x))
        v = self.v(x)
        out = attend(q, self.k(x), v, self.attention_biases[:, self.attention_bias_idxs], self.heads,
                     self.key_dim)
        return self.proj(self.act(out + self.v_local(v)))


class AttentionEmbedding(nn.Module):
    """Static last embedding: strided ConvNorm plus the downsampling attention (timm Downsample)."""

    def __init__(self, conv: nn.Module, attn: nn.Module):
        super().__init__()
        self.conv, self.attn = conv, attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x) + self.conv(x)


class DynamicAttentionEmbedding(nn.Module):
    """SCAN-Edge "MHSA DS" embedding: ConvNorm 3x3/2 + Attention2dDownsample with searched V and act.

    Queries come from the local-global query (depthwise 3x3/2 conv + 1x1 stride-2 pooling), keys and
    values from the full map, so the attention itself halves the resolution.
    """

    def __init__(self, max_in: int, max_out: int, kernel: int, heads: int, key_dim: int,
                 max_expansion: int, table_size: int):
        super().__init__()
        self.kernel, self.heads, self.key_dim = kernel, heads, key_dim
        qk, v_max = heads * key_dim, heads * key_dim * max_expansion
        self.conv = conv_norm(max_in, max_out, kernel, stride=2)
        self.q_local = DynamicConv2d(max_in, max_in, 3, stride=2, depthwise=True, bias=True)
        self.q_proj = conv_norm(max_in, qk)
        self.k = conv_norm(max_in, qk)
        self.v = conv_norm(max_in, v_max)
        self.v_local = conv_norm(v_max, v_max, 3, stride=2, depthwise=True)
        self.proj = conv_norm(v_max, max_out)
        self.attention_biases = nn.Parameter(torch.zeros(heads, table_size, table_size))
        self._index_cache: dict[tuple, torch.Tensor] = {}

    def _index(self, q_grid, k_grid, device) -> torch.Tensor:
        key = (q_grid, k_grid, str(device))
        if key not in self._index_cache:
            table_hw = active_table_hw(self.attention_biases, k_grid)
            self._index_cache[key] = relative_bias_index(table_hw, q_grid, k_grid, 2).to(device)
        return self._index_cache[key]

    def forward(self, x: torch.Tensor, width: int, expansion: int, act: str) -> torch.Tensor:
        v_ch = self.heads * self.key_dim * expansion
        q = self.q_proj(self.q_local(x) + F.avg_pool2d(x, 1, 2, 0))
        k_grid, q_grid = tuple(x.shape[2:]), tuple(q.shape[2:])
        bias = _bias_table(self.attention_biases, k_grid)[:, self._index(q_grid, k_grid, x.device)]
        v = self.v(x, v_ch)
        out = attend(q, self.k(x), v, bias, self.heads, self.key_dim) + self.v_local(v)
        return self.proj(act_fn(act)(out), width) + self.conv(x, width)

    @torch.no_grad()
    def static(self, shape: Shape, width: int, expansion: int, act: str) -> nn.Module:
        dim, v_ch = shape[0], self.heads * self.key_dim * expansion
        k_grid = tuple(shape[1:])
        q_grid = tuple(conv_out_size(s, 3, 2) for s in k_grid)
        parts = {
            "q_local": self.q_local.static(dim), "q_proj": self.q_proj.static(dim), "k": self.k.static(dim),
            "v": self.v.static(dim, v_ch), "v_local": self.v_local.static(v_ch),
            "proj": self.proj.static(v_ch, width),
        }
        table_hw = active_table_hw(self.attention_biases, k_grid)
        attn = Attention4dDownsample(parts, _bias_table(self.attention_biases, k_grid),
                                     relative_bias_index(table_hw, q_grid, k_grid, 2), self.heads, self.key_dim,
                                     act)
        return AttentionEmbedding(self.conv.static(dim, width), attn)

    def out_shape(self, shape: Shape, width: int, **_) -> Shape:
        return (width, *(conv_out_size(s, self.kernel, 2) for s in shape[1:]))

    def cost(self, shape: Shape, width: int, expansion: int, act: str) -> tuple[int, int]:
        dim, k_grid = shape[0], shape[1:]
        qk, v_ch = self.heads * self.key_dim, self.heads * self.key_dim * expansion
        q_grid = tuple(conv_out_size(s, 3, 2) for s in k_grid)
        nq, nk = q_grid[0] * q_grid[1], k_grid[0] * k_grid[1]
        th, tw = active_table_hw(self.attention_biases, k_grid)
        return add_costs(
            self.conv.cost(dim, width, self.kernel, self.out_shape(shape, width)[1:]),
            conv_cost(dim, dim, 3, q_grid, depthwise=True, bias=True, bn=False),  # q_local
            self.q_proj.cost(dim, qk, 1, q_grid), self.k.cost(dim, qk, 1, k_grid),
            self.v.cost(dim, v_ch, 1, k_grid), self.v_local.cost(v_ch, None, 3, q_grid),
            (0, self.heads * nq * nk * (self.key_dim + v_ch // self.heads)),
            self.proj.cost(v_ch, width, 1, q_grid), (self.heads * th * tw, 0),
        )


# ---- head ----------------------------------------------------------------------------------------
class DynamicHead(nn.Module):
    """The classifier head, elastic in its input width."""

    def __init__(self, max_dim: int, num_classes: int, distillation: bool):
        super().__init__()
        self.num_classes = num_classes
        self.norm = DynamicBatchNorm2d(max_dim)
        self.fc = DynamicLinear(max_dim, num_classes)
        self.fc_dist = DynamicLinear(max_dim, num_classes) if distillation else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return classify(x, self.norm, spatial_mean, self.fc, self.fc_dist)

    def static(self, shape: Shape) -> nn.Module:
        dim = shape[0]
        return ClassifierHead(self.norm.static(dim), spatial_mean, self.fc.static(dim),
                              self.fc_dist.static(dim) if self.fc_dist is not None else None)

    def out_shape(self, shape: Shape) -> tuple[int]:
        return (self.num_classes,)

    def cost(self, shape: Shape) -> tuple[int, int]:
        heads = 2 if self.fc_dist is not None else 1
        linear = shape[0] * self.num_classes
        return 2 * shape[0] + heads * (linear + self.num_classes), heads * linear
