"""Weight-entangled multi-head self-attention, MLP and pre-norm transformer block (ViT style).

Every dynamic module here slices its largest weights through `DynamicLinear` / `DynamicLayerNorm`
(prefix slicing only) and has a `static(...)` twin built from plain `nn.Linear` / `nn.LayerNorm`, so
an extracted subnet holds no dynamic layer. The linear layers are named `qkv`, `proj`, `fc1` and
`fc2` on purpose: Mixture-of-LoRA-Experts fine-tuning (TAS-LoRA) attaches its experts to exactly
these `DynamicLinear`s, so anything that wraps them must keep `forward(x, out_features)` and
`static(in_features, out_features)`.

qkv layout. The fused qkv output is channel-interleaved, `[q_0, k_0, v_0, q_1, k_1, v_1, ...]`, the
layout AutoFormer's `qkv_super` uses: the first `3 * heads * head_dim` rows then hold q, k and v
of the first `heads` heads, so choosing fewer heads is a plain prefix slice of one weight (a
`[q; k; v]` block layout would need a strided gather instead). The static twin keeps the same
layout, so supernet and extracted subnet run the identical computation.

Attention is an explicit matmul + softmax (not `F.scaled_dot_product_attention`) so that the
FLOP counter sees two batched matmuls and the ONNX graph stays plain.
"""

from __future__ import annotations

import torch
from torch import nn

from raynas.nn.dynamic import DynamicLayerNorm, DynamicLinear


def multi_head_attention(qkv: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Self-attention over channel-interleaved qkv features of shape (..., T, 3 * heads * head_dim).

    Leading dimensions are independent sequences (batch, or batch x patch position in MobileViT).
    Returns (..., T, heads * head_dim). Shared by the dynamic and the static module so both run the
    same ops in the same order.
    """
    lead, t = qkv.shape[:-2], qkv.shape[-2]
    if len(lead) != 1:
        qkv = qkv.reshape(-1, t, qkv.shape[-1])
    b = qkv.shape[0]
    q, k, v = qkv.reshape(b, t, num_heads, head_dim, 3).permute(4, 0, 2, 1, 3).unbind(0)
    attn = (q @ k.transpose(-2, -1)) * (head_dim**-0.5)
    attn = attn.softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, t, num_heads * head_dim)
    return out if len(lead) == 1 else out.reshape(*lead, t, num_heads * head_dim)


class MultiHeadSelfAttention(nn.Module):
    """Static multi-head self-attention on (..., T, dim) tokens (the extracted form).

    Built from existing layers (`qkv`: dim -> 3 * heads * head_dim, interleaved; `proj`: back to
    dim) so extraction copies each weight once instead of initialising throwaway ones.
    """

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, num_heads: int, head_dim: int):
        super().__init__()
        if qkv.out_features != 3 * num_heads * head_dim or proj.in_features != num_heads * head_dim:
            raise ValueError("MultiHeadSelfAttention: qkv/proj widths do not match heads x head_dim")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv, self.proj = qkv, proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(multi_head_attention(self.qkv(x), self.num_heads, self.head_dim))


class DynamicMultiHeadSelfAttention(nn.Module):
    """Self-attention whose head count (and optionally head width) is chosen per forward.

    The token width is read from the input; the output has the same width (proj is sliced to it).
    `head_dim` defaults to the fixed width given at construction (64 in AutoFormer); spaces whose
    head width follows the embedding width (MobileViT-style) pass it per call instead.
    """

    def __init__(self, max_dim: int, max_heads: int, head_dim: int, max_head_dim: int | None = None,
                 qkv_bias: bool = True):
        super().__init__()
        self.max_dim, self.max_heads, self.head_dim = max_dim, max_heads, head_dim
        self.max_head_dim = max_head_dim or head_dim
        inner = max_heads * self.max_head_dim
        self.qkv = DynamicLinear(max_dim, 3 * inner, bias=qkv_bias)
        self.proj = DynamicLinear(inner, max_dim)

    def _sizes(self, num_heads: int, head_dim: int | None) -> tuple[int, int]:
        d = head_dim or self.head_dim
        if not 1 <= num_heads <= self.max_heads or not 1 <= d <= self.max_head_dim:
            raise ValueError(f"DynamicMultiHeadSelfAttention: heads={num_heads}/{self.max_heads} "
                             f"head_dim={d}/{self.max_head_dim} not available")
        return num_heads, d

    def forward(self, x: torch.Tensor, num_heads: int, head_dim: int | None = None) -> torch.Tensor:
        h, d = self._sizes(num_heads, head_dim)
        out = multi_head_attention(self.qkv(x, 3 * h * d), h, d)
        return self.proj(out, x.shape[-1])

    @torch.no_grad()
    def static(self, dim: int, num_heads: int, head_dim: int | None = None) -> MultiHeadSelfAttention:
        h, d = self._sizes(num_heads, head_dim)
        return MultiHeadSelfAttention(self.qkv.static(dim, 3 * h * d), self.proj.static(h * d, dim), h, d)


class Mlp(nn.Module):
    """Static token MLP: fc1 -> GELU -> fc2, built from existing layers."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear):
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, nn.GELU(), fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DynamicMlp(nn.Module):
    """Token MLP with an elastic hidden width; output width follows the input width."""

    def __init__(self, max_dim: int, max_hidden: int):
        super().__init__()
        self.fc1 = DynamicLinear(max_dim, max_hidden)
        self.act = nn.GELU()
        self.fc2 = DynamicLinear(max_hidden, max_dim)

    def forward(self, x: torch.Tensor, hidden: int) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x, hidden)), x.shape[-1])

    @torch.no_grad()
    def static(self, dim: int, hidden: int) -> Mlp:
        return Mlp(self.fc1.static(dim, hidden), self.fc2.static(hidden, dim))


class TransformerBlock(nn.Module):
    """Static pre-norm encoder block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, norm1: nn.LayerNorm, attn: MultiHeadSelfAttention, norm2: nn.LayerNorm, mlp: Mlp):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DynamicTransformerBlock(nn.Module):
    """Pre-norm encoder block with elastic width (from the input), heads and MLP hidden width."""

    def __init__(self, max_dim: int, max_heads: int, max_hidden: int, head_dim: int,
                 max_head_dim: int | None = None, qkv_bias: bool = True, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = DynamicLayerNorm(max_dim, eps=norm_eps)
        self.attn = DynamicMultiHeadSelfAttention(max_dim, max_heads, head_dim, max_head_dim, qkv_bias)
        self.norm2 = DynamicLayerNorm(max_dim, eps=norm_eps)
        self.mlp = DynamicMlp(max_dim, max_hidden)

    def forward(self, x: torch.Tensor, num_heads: int, hidden: int, head_dim: int | None = None):
        x = x + self.attn(self.norm1(x), num_heads, head_dim)
        return x + self.mlp(self.norm2(x), hidden)

    @torch.no_grad()
    def static(self, dim: int, num_heads: int, hidden: int, head_dim: int | None = None) -> TransformerBlock:
        return TransformerBlock(self.norm1.static(dim), self.attn.static(dim, num_heads, head_dim),
                                self.norm2.static(dim), self.mlp.static(dim, hidden))
