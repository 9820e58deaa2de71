"""Mixture-of-LoRA-Experts building blocks (seed 003, TAS-LoRA §3.3): LoRA expert layers and the router.

A trained AutoFormer supernet is frozen; every block's `qkv`, `proj`, `fc1`, `fc2` and the
classifier `head` get E rank-r LoRA experts (`MoLELinear`). An LSTM router reads the sampled
subnet's per-block attributes (heads, MLP ratio, embedding dim), and gives each of those layers a
softmax mixture over its experts (eq. 5-6). The effective weight of a layer is

    W' = W[:out, :in] + s * sum_e g_e * B_e[:out] @ A_e[:, :in]          (eq. 8, s = alpha / rank)

LoRA factors are sliced by the same prefixes as the entangled weight, so one set of experts serves
every width. The router depends only on the architecture, not on the input, so for a fixed subnet
W' is a constant: `extract(arch)` bakes it into plain `nn.Linear`s (no inference overhead), and
the extracted subnet has exactly the base subnet's shapes, parameters and MACs.

Group-wise router initialisation (§3.3.2): blocks are grouped by (heads, MLP ratio, embedding dim),
one expert per group by default (AutoFormer-T 12, -S 27, -B 18). Each group has its own router head
whose weights start at zero and whose bias is `init_bias` (paper: 3) on the group's expert, so at
first every group uses "its" expert, whatever the LSTM says; training then moves away from that.

`raynas.supernets.mole` assembles them into a `MoLESupernet` around a frozen AutoFormer supernet.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raynas import config as c
from raynas.nn.dynamic import DynamicLinear

# The block layers MoLE adapts, in router-output order (the classifier has its own router head).
BLOCK_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
ROUTER_INITS = ("groupwise", "random")
FORWARD_MODES = ("auto", "merged", "branch")

# TAS-LoRA §4.1.2: rank 8, LSTM hidden 128, attribute embedding 256, delta 3; experts = groups (0).
MOLE_DEFAULTS: dict[str, Any] = {
    "rank": 8,
    "alpha": 8.0,            # LoRA scale s = alpha / rank (alpha = rank: eq. 4 without scaling)
    "num_experts": 0,        # 0: one expert per (heads, mlp_ratio, embed_dim) group, as the paper
    "router_embed": 256,
    "router_hidden": 128,
    "router_init": "groupwise",
    "init_bias": 3.0,        # delta of the group-wise initialisation
}


def validate_mole_config(config: Mapping[str, Any] | None, where: str = "mole") -> dict[str, Any]:
    """Defaults filled in; unknown keys and bad values raise ConfigError naming `{where}.{key}`."""
    out = c.with_defaults(config, MOLE_DEFAULTS, where)
    for key in ("rank", "router_embed", "router_hidden"):
        c.integer(out[key], f"{where}.{key}", minimum=1)
    c.integer(out["num_experts"], f"{where}.num_experts", minimum=0)  # 0: one per group
    out["alpha"] = c.number(out["alpha"], f"{where}.alpha", 0.0, low_open=True)
    out["init_bias"] = c.number(out["init_bias"], f"{where}.init_bias")
    c.choice(out["router_init"], f"{where}.router_init", ROUTER_INITS)
    return out


# ---- LoRA experts on one entangled linear layer ---------------------------------------------------
class MoLELinear(DynamicLinear):
    """A `DynamicLinear` (frozen base weight, same parameter names) plus E rank-r LoRA experts.

    `lora_a` is (E, r, max_in), `lora_b` is (E, max_out, r); a subnet uses their prefixes. The
    owner sets `gates` (E mixture weights) before each forward / `static` call. B starts at zero
    (LoRA's initialisation), so a freshly attached layer computes exactly the base layer.

    Two equivalent forwards: `branch` adds sum_e g_e B_e A_e x to W x (eq. 4); `merged` builds W'
    once and runs one linear (eq. 8). Merging costs out*in*E*r MACs per call, the branch
    tokens*(in+out)*E*r, so `auto` picks the cheaper one: merged for training batches, the
    branch for a few tokens.
    """

    def __init__(self, base: DynamicLinear, num_experts: int, rank: int, scale: float):
        # DynamicLinear.__init__ is skipped on purpose: it would allocate and initialise a weight
        # that is thrown away; the base layer's Parameters are adopted instead (no copy).
        nn.Module.__init__(self)
        self.max_in, self.max_out = base.max_in, base.max_out
        self.weight, self.bias = base.weight, base.bias
        self.num_experts, self.rank, self.scale = num_experts, rank, scale
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(num_experts, rank, base.max_in, device=device))
        self.lora_b = nn.Parameter(torch.zeros(num_experts, base.max_out, rank, device=device))
        for a in self.lora_a.data:  # each expert as a LoRA A matrix (Kaiming-uniform, as in LoRA / peft)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.gates: torch.Tensor | None = None
        self.forward_mode = "auto"

    def _factors(self, in_f: int, out_f: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the active slice with the gates and scale folded into A: (E*r, in), (out, E*r)."""
        if self.gates is None:
            raise RuntimeError("MoLELinear: no routing weights set (call it through its MoLESupernet)")
        e, r = self.num_experts, self.rank
        mix = (self.gates.to(self.lora_a.dtype) * self.scale).repeat_interleave(r)  # (E*r,)
        a = self.lora_a[:, :, :in_f].reshape(e * r, in_f) * mix[:, None]
        b = self.lora_b[:, :out_f, :].permute(1, 0, 2).reshape(out_f, e * r)
        return a, b

    def delta_weight(self, in_f: int, out_f: int) -> torch.Tensor:
        """s * sum_e g_e B_e A_e on the active slice: what merging adds to W[:out, :in]."""
        a, b = self._factors(in_f, out_f)
        return b @ a

    def merged_weight(self, in_f: int, out_f: int) -> torch.Tensor:
        w, _ = self.active(in_f, out_f)
        return w + self.delta_weight(in_f, out_f).to(w.dtype)

    def forward(self, x: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
        in_f, out_f = x.shape[-1], out_features or self.max_out
        w, b = self.active(in_f, out_f)
        tokens = x.numel() // max(in_f, 1)
        mode = self.forward_mode
        if mode == "auto":
            mode = "branch" if tokens * (in_f + out_f) < in_f * out_f else "merged"
        if mode == "merged":
            return F.linear(x, w + self.delta_weight(in_f, out_f).to(w.dtype), b)
        a, bb = self._factors(in_f, out_f)
        return F.linear(x, w, b) + F.linear(F.linear(x, a.to(x.dtype)), bb.to(x.dtype))

    @torch.no_grad()
    def static(self, in_f: int, out_features: int | None = None) -> nn.Linear:
        """A plain nn.Linear holding W' for the current gates (LoRA merged: no extra inference cost)."""
        lin = super().static(in_f, out_features)
        lin.weight.copy_(self.merged_weight(in_f, lin.out_features))
        return lin

    def extra_repr(self) -> str:
        return (f"max_in={self.max_in}, max_out={self.max_out}, experts={self.num_experts}, rank={self.rank}, "
                f"scale={self.scale:g}")


# ---- the router --------------------------------------------------------------------------------------
class LSTMRouter(nn.Module):
    """Attribute embeddings -> single-layer LSTM over the active blocks -> per-group router heads.

    Input: the (heads, mlp_ratio, embed_dim) of each active block. Output: softmax expert weights
    for each block's `len(BLOCK_TARGETS)` layers, (depth, L, E), and for the classifier, (E,),
    which reads the LSTM state of the last block (TAS-LoRA footnote 2).
    """

    def __init__(self, heads: tuple[int, ...], mlp_ratios: tuple[float, ...], embed_dims: tuple[int, ...],
                 num_experts: int, embed: int, hidden: int, init: str, init_bias: float,
                 layers_per_block: int = len(BLOCK_TARGETS)):
        super().__init__()
        self.heads, self.mlp_ratios, self.embed_dims = tuple(heads), tuple(mlp_ratios), tuple(embed_dims)
        self.num_experts, self.layers_per_block = num_experts, layers_per_block
        self.heads_embedding = nn.Embedding(len(self.heads), embed)
        self.mlp_embedding = nn.Embedding(len(self.mlp_ratios), embed)
        self.dim_embedding = nn.Embedding(len(self.embed_dims), embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=1, batch_first=True)
        groups = self.num_groups
        self.block_weight = nn.Parameter(torch.empty(groups, layers_per_block * num_experts, hidden))
        self.block_bias = nn.Parameter(torch.empty(groups, layers_per_block * num_experts))
        self.head_weight = nn.Parameter(torch.empty(groups, num_experts, hidden))
        self.head_bias = nn.Parameter(torch.empty(groups, num_experts))
        self.reset_heads(init, init_bias)

    @property
    def num_groups(self) -> int:
        return len(self.heads) * len(self.mlp_ratios) * len(self.embed_dims)

    def expert_of_group(self, group: int) -> int:
        """The expert a group is biased towards by the group-wise initialisation."""
        return group % self.num_experts

    @torch.no_grad()
    def reset_heads(self, init: str, init_bias: float) -> None:
        if init == "groupwise":
            # Zero weights: the LSTM state cannot move the initial choice; the bias alone picks the
            # group's expert in every layer of the block (and in the classifier).
            for p in (self.block_weight, self.block_bias, self.head_weight, self.head_bias):
                p.zero_()
            for g in range(self.num_groups):
                e = self.expert_of_group(g)
                for layer in range(self.layers_per_block):
                    self.block_bias[g, layer * self.num_experts + e] = init_bias
                self.head_bias[g, e] = init_bias
        elif init == "random":  # nn.Linear's default initialisation, per group head
            fan_in = self.block_weight.shape[-1]
            bound = 1 / math.sqrt(fan_in)
            for w in (self.block_weight, self.head_weight):
                for g in range(self.num_groups):
                    nn.init.kaiming_uniform_(w[g], a=math.sqrt(5))
            for b in (self.block_bias, self.head_bias):
                nn.init.uniform_(b, -bound, bound)
        else:
            c.fail("mole.router_init", f"{init!r} is not allowed", list(ROUTER_INITS))

    def attribute_indices(self, attributes: list[tuple[int, float, int]]) -> tuple[torch.Tensor, ...]:
        try:
            h = [self.heads.index(a[0]) for a in attributes]
            m = [self.mlp_ratios.index(float(a[1])) for a in attributes]
            d = [self.embed_dims.index(a[2]) for a in attributes]
        except ValueError:
            raise ValueError(f"LSTMRouter: attributes {attributes} are not among heads {self.heads}, "
                             f"mlp ratios {self.mlp_ratios}, embed dims {self.embed_dims}") from None
        device = self.block_bias.device
        return tuple(torch.tensor(v, dtype=torch.long, device=device) for v in (h, m, d))

    def groups_of(self, attributes: list[tuple[int, float, int]]) -> torch.Tensor:
        h, m, d = self.attribute_indices(attributes)
        return (h * len(self.mlp_ratios) + m) * len(self.embed_dims) + d

    def forward(self, attributes: list[tuple[int, float, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        if not attributes:
            raise ValueError("LSTMRouter: a subnet needs at least one block")
        h, m, d = self.attribute_indices(attributes)
        tokens = self.heads_embedding(h) + self.mlp_embedding(m) + self.dim_embedding(d)  # (D, embed)
        states, _ = self.lstm(tokens.unsqueeze(0))
        states = states.squeeze(0)  # (D, hidden)
        groups = (h * len(self.mlp_ratios) + m) * len(self.embed_dims) + d
        logits = torch.einsum("dkh,dh->dk", self.block_weight[groups], states) + self.block_bias[groups]
        block_gates = logits.view(len(attributes), self.layers_per_block, self.num_experts).softmax(dim=-1)
        last = groups[-1]
        head_gates = (self.head_weight[last] @ states[-1] + self.head_bias[last]).softmax(dim=-1)
        return block_gates, head_gates


__all__ = ["BLOCK_TARGETS", "FORWARD_MODES", "LSTMRouter", "MOLE_DEFAULTS", "MoLELinear", "validate_mole_config"]
