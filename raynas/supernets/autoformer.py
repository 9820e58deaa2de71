"""AutoFormer ViT supernet (seed 003, TAS-LoRA Table 2): elastic embed dim, depth, per-block heads and MLP ratio.

One weight-entangled ViT holds every subnet, as in AutoFormer: the 16x16 patch-embedding conv, the
class token, the position embedding, every block's LayerNorms / qkv / proj / fc1 / fc2, the final
norm and the classifier are sliced to the sampled embedding dim; each block picks its own number of
heads (64 channels each, AutoFormer's `change_qkv` setting) and MLP ratio; blocks beyond the sampled
depth are skipped. The space's structure (choices, patch size, head width, pooling) is read from
the YAML (`spaces/autoformer-*.yaml`), never hard-coded here.

Position embeddings belong to the space's resolution. A different input resolution (the protocol
tests run at 32, i.e. 2x2 patches when the YAML says 224) resamples the sliced table with timm's
bicubic `resample_abs_pos_embed`; `forward` and `blocks` call the same function on the same slice,
so the extracted subnet (which stores the resampled table) computes exactly what the supernet does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_
from torch import nn

from raynas import config as c
from raynas.nn.attention import DynamicTransformerBlock
from raynas.nn.dynamic import DynamicLayerNorm, DynamicLinear
from raynas.nn.layers import ClassifierHead, classify
from raynas.space import Arch, SearchSpace
from raynas.space.space import Dim, SpaceError
from raynas.space.summary import per_block
from raynas.supernets.base import Block, Supernet, declared_fields

FAMILY_KEYS = ("patch_size", "head_dim", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
               "global_pool")
# AutoFormer's LayerNormSuper is a plain nn.LayerNorm, hence torch's default eps (timm ViTs use 1e-6).
NORM_EPS = 1e-5


def embed_dim_name() -> str:
    return "embed_dim"


def depth_name() -> str:
    return "depth"


def heads_name(i: int) -> str:
    return f"b{i}.heads"


def mlp_ratio_name(i: int) -> str:
    return f"b{i}.mlp_ratio"


def mlp_hidden(embed_dim: int, mlp_ratio: float) -> int:
    """MLP hidden width, truncated as AutoFormer does (`int(embed_dim * mlp_ratio)`)."""
    return int(embed_dim * mlp_ratio)


# ---- space ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AutoFormerSpec:
    """The validated family keys of an AutoFormer YAML."""

    patch_size: int
    head_dim: int
    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    mlp_ratios: tuple[float, ...]
    qkv_bias: bool
    global_pool: str

    @property
    def max_depth(self) -> int:
        return self.depths[-1]

    @property
    def max_hidden(self) -> int:
        return max(mlp_hidden(e, r) for e in self.embed_dims for r in self.mlp_ratios)


class AutoFormerSpace(SearchSpace):
    """Flat dims `embed_dim`, `depth`, `b{i}.heads`, `b{i}.mlp_ratio` for i < max depth."""

    spec: AutoFormerSpec

    def canonicalize(self, values: dict[str, Any]) -> dict[str, Any]:
        # Blocks past the depth do not exist: reset them so equal networks hash equal.
        depth = values[depth_name()]
        for i in range(depth, self.spec.max_depth):
            values[heads_name(i)] = self.spec.num_heads[0]
            values[mlp_ratio_name(i)] = self.spec.mlp_ratios[0]
        return values

    def arch_summary(self, arch: Mapping[str, Any]) -> str:
        """`192x12 h3 r4`: embed dim x depth, then the blocks' heads and MLP ratios (one value when they agree)."""
        blocks = range(arch[depth_name()])
        return (f"{arch[embed_dim_name()]}x{len(blocks)} h{per_block(arch[heads_name(i)] for i in blocks)} "
                f"r{per_block(arch[mlp_ratio_name(i)] for i in blocks)}")

    def log10_cardinality(self) -> float:
        per_block = len(self.spec.num_heads) * len(self.spec.mlp_ratios)
        networks = len(self.spec.embed_dims) * sum(per_block**d for d in self.spec.depths)
        return math.log10(networks)

    def block_attributes(self, arch: Arch) -> list[tuple[int, float, int]]:
        """(heads, mlp_ratio, embed_dim) of each active block, in order (TAS-LoRA router input)."""
        e = arch[embed_dim_name()]
        return [(arch[heads_name(i)], arch[mlp_ratio_name(i)], e) for i in range(arch[depth_name()])]


def parse_spec(cfg: Mapping[str, Any], where: str) -> AutoFormerSpec:
    patch = c.integer(c.required(cfg, "patch_size", where), f"{where}.patch_size", minimum=1)
    resolution = cfg.get("resolution", 224)
    if resolution % patch:
        c.fail(f"{where}.resolution", f"{resolution} is not allowed with patch_size {patch}", f"multiples of {patch}")
    ratios = tuple(float(r) for r in c.number_choices(c.required(cfg, "mlp_ratio", where), f"{where}.mlp_ratio",
                                                      as_set=True))
    embeds = c.int_choices(c.required(cfg, "embed_dim", where), f"{where}.embed_dim", as_set=True)
    if mlp_hidden(embeds[0], ratios[0]) < 1:
        c.fail(f"{where}.mlp_ratio", f"{ratios[0]} gives an empty MLP at embed_dim {embeds[0]}",
               "ratios with embed_dim * ratio >= 1")
    return AutoFormerSpec(
        patch_size=patch,
        head_dim=c.integer(cfg.get("head_dim", 64), f"{where}.head_dim", minimum=1),
        embed_dims=embeds,
        depths=c.int_choices(c.required(cfg, "depth", where), f"{where}.depth", as_set=True),
        num_heads=c.int_choices(c.required(cfg, "num_heads", where), f"{where}.num_heads", as_set=True),
        mlp_ratios=ratios,
        qkv_bias=c.boolean(cfg.get("qkv_bias", True), f"{where}.qkv_bias"),
        global_pool=c.choice(cfg.get("global_pool", "cls"), f"{where}.global_pool", tuple(TOKEN_POOLS)),
    )


def build_space(cfg: dict) -> AutoFormerSpace:
    where = f"space {cfg['name']}"
    spec = parse_spec(cfg, where)
    dims = [Dim(embed_dim_name(), spec.embed_dims), Dim(depth_name(), spec.depths)]
    for i in range(spec.max_depth):
        dims += [Dim(heads_name(i), spec.num_heads), Dim(mlp_ratio_name(i), spec.mlp_ratios)]
    space = AutoFormerSpace(dims=tuple(dims), **declared_fields(cfg))
    space.spec = spec
    return space


# ---- static pieces of an extracted subnet -----------------------------------------------------------
def class_token(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0]


def mean_patch_tokens(x: torch.Tensor) -> torch.Tensor:
    """AutoFormer's `--gp`: the mean of the patch tokens (the class token still attends)."""
    return x[:, 1:].mean(dim=1)


TOKEN_POOLS = {"cls": class_token, "mean": mean_patch_tokens}


class TokenEmbedding(nn.Module):
    """Patch conv -> tokens, class token prepended, position embedding added."""

    def __init__(self, proj: nn.Conv2d, cls_token: torch.Tensor, pos_embed: torch.Tensor):
        super().__init__()
        self.proj = proj
        self.cls_token = nn.Parameter(cls_token.detach().clone())
        self.pos_embed = nn.Parameter(pos_embed.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed


class DynamicPatchEmbed(nn.Module):
    """Non-overlapping patch conv (kernel = stride = patch) whose output channels are sliced."""

    def __init__(self, in_channels: int, max_dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        # nn.Conv2d for its default initialisation, as AutoFormer's PatchembedSuper.
        self.proj = nn.Conv2d(in_channels, max_dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return F.conv2d(x, self.proj.weight[:dim], self.proj.bias[:dim], stride=self.patch_size)

    @torch.no_grad()
    def static(self, dim: int) -> nn.Conv2d:
        conv = nn.Conv2d(self.proj.in_channels, dim, self.patch_size, stride=self.patch_size)
        conv.weight.copy_(self.proj.weight[:dim])
        conv.bias.copy_(self.proj.bias[:dim])
        return conv


# ---- supernet ---------------------------------------------------------------------------------------
class AutoFormerSupernet(Supernet):
    """Weight-entangled ViT. `forward(x, None)` runs the largest subnet (the teacher).

    Layer names `layers[i].attn.qkv`, `.attn.proj`, `.mlp.fc1`, `.mlp.fc2` and `head` are the
    `DynamicLinear`s that TAS-LoRA's Mixture-of-LoRA-Experts attaches to.
    """

    space: AutoFormerSpace

    def __init__(self, space: AutoFormerSpace):
        super().__init__(space)
        spec = self.spec = space.spec
        max_dim = spec.embed_dims[-1]
        self.grid = (space.resolution // spec.patch_size,) * 2
        self.patch_embed = DynamicPatchEmbed(space.in_channels, max_dim, spec.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, max_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 1, max_dim))
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        self.layers = nn.ModuleList(
            DynamicTransformerBlock(max_dim, spec.num_heads[-1], spec.max_hidden, spec.head_dim,
                                    qkv_bias=spec.qkv_bias, norm_eps=NORM_EPS)
            for _ in range(spec.max_depth)
        )
        self.norm = DynamicLayerNorm(max_dim, eps=NORM_EPS)
        self.head = DynamicLinear(max_dim, space.num_classes)
        self._teacher = space.max_arch()

    # ---- helpers -------------------------------------------------------------------------------
    def _grid(self, height: int, width: int | None = None) -> tuple[int, int]:
        """Patch grid of an input; sizes that leave pixels uncovered are refused, not cropped."""
        p = self.spec.patch_size
        for size in (height, width or height):
            if size < p or size % p:
                raise SpaceError(f"resolution: {size} is not allowed for space '{self.space.name}'; "
                                 f"allowed: multiples of patch_size {p}")
        return height // p, (width or height) // p

    def position_embedding(self, dim: int, grid: tuple[int, int]) -> torch.Tensor:
        """The table for `dim` channels and a patch grid; resampled when the grid is not the space's."""
        pos = self.pos_embed[..., :dim]
        if grid != self.grid:
            pos = resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(self.grid), num_prefix_tokens=1)
        return pos

    def block_attributes(self, arch: Mapping[str, Any]) -> list[tuple[int, float, int]]:
        """(heads, mlp_ratio, embed_dim) per active block: the TAS-LoRA router's input sequence."""
        return self.space.block_attributes(self.space.validate(arch))

    # ---- protocol ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, arch: Arch | Mapping[str, Any] | None = None) -> torch.Tensor:
        arch = self._teacher if arch is None else self.as_arch(arch)
        dim = arch[embed_dim_name()]
        grid = self._grid(x.shape[-2], x.shape[-1])
        x = self.patch_embed(x, dim).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token[..., :dim].expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.position_embedding(dim, grid)
        for i in range(arch[depth_name()]):
            x = self.layers[i](x, arch[heads_name(i)], mlp_hidden(dim, arch[mlp_ratio_name(i)]))
        return classify(x, self.norm, TOKEN_POOLS[self.spec.global_pool], self.head)

    @torch.no_grad()
    def blocks(self, arch: Arch, resolution: int | None = None) -> list[Block]:
        spec, space = self.spec, self.space
        arch = space.validate(arch)
        res = resolution or space.resolution
        grid = self._grid(res)
        dim, c = arch[embed_dim_name()], space.in_channels
        tokens = grid[0] * grid[1] + 1
        embed = TokenEmbedding(self.patch_embed.static(dim), self.cls_token[..., :dim],
                               self.position_embedding(dim, grid))
        out = [Block(f"autoformer.embed(in={c}x{res}x{res},patch={spec.patch_size},dim={dim})", embed,
                     (1, c, res, res))]
        for i in range(arch[depth_name()]):
            heads, hidden = arch[heads_name(i)], mlp_hidden(dim, arch[mlp_ratio_name(i)])
            key = (f"autoformer.block(tokens={tokens},dim={dim},heads={heads},head_dim={spec.head_dim},"
                   f"hidden={hidden},qkv_bias={int(spec.qkv_bias)})")
            out.append(Block(key, self.layers[i].static(dim, heads, hidden), (1, tokens, dim)))
        head = ClassifierHead(self.norm.static(dim), TOKEN_POOLS[spec.global_pool], self.head.static(dim))
        key = f"autoformer.head(tokens={tokens},dim={dim},pool={spec.global_pool},classes={space.num_classes})"
        out.append(Block(key, head, (1, tokens, dim)))
        return out

    def cost(self, arch: Arch, resolution: int | None = None) -> dict[str, int]:
        """Exact params / MACs of the extracted subnet (MACs: conv, linear and attention matmuls)."""
        spec, space = self.spec, self.space
        arch = self.as_arch(arch)
        gh, gw = self._grid(resolution or space.resolution)
        patches, c, p = gh * gw, space.in_channels, spec.patch_size
        tokens, dim = patches + 1, arch[embed_dim_name()]
        params = dim * c * p * p + dim + dim + tokens * dim  # conv weight + bias, class token, positions
        macs = patches * dim * c * p * p
        for i in range(arch[depth_name()]):
            inner = arch[heads_name(i)] * spec.head_dim
            hidden = mlp_hidden(dim, arch[mlp_ratio_name(i)])
            params += 2 * dim + dim * 3 * inner + (3 * inner if spec.qkv_bias else 0)  # norm1, qkv
            params += inner * dim + dim + 2 * dim  # proj, norm2
            params += dim * hidden + hidden + hidden * dim + dim  # fc1, fc2
            macs += tokens * (dim * 3 * inner + inner * dim + 2 * dim * hidden)
            macs += 2 * tokens * tokens * inner  # q @ k^T and attn @ v
        params += 2 * dim + dim * space.num_classes + space.num_classes  # final norm, classifier
        macs += dim * space.num_classes
        return {"params": params, "macs": macs}


def build_supernet(space: AutoFormerSpace, **kwargs: Any) -> AutoFormerSupernet:
    if kwargs:
        raise SpaceError(f"autoformer supernet: unknown options {sorted(kwargs)}; allowed: none")
    return AutoFormerSupernet(space)
