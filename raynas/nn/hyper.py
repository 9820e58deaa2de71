"""Kshot-Hypernet parts (seed 000, §3.1-3.2): conv weights generated from the architecture.

One shared architecture feature z (h x rank) and one coefficient vector lambda (N) come from an
MLP-Mixer over the arch encoding (one token per arch dimension). Every conv slot i has its own
generator g^i: two fully connected maps, A^i (h -> C_in, one copy per dictionary entry: the K-shot
dictionary) and B^i (rank -> C_out * K * K), so

    w_n^i = gain^i (A_n^i)^T z B^i   (eq. 2, the dictionary Theta = g^i(z); gain^i a fixed scale)
    W^i   = sum_n lambda_n w_n^i     (eq. 3)
    lambda = softmax(CAB(f(alpha)) / T)   (eq. 4, CAB = channel attention over the N coefficients)

Unit-kernel stacking: a generator emits unit kernels of at most `unit` x `unit` x K x K; a slot's
weight is the grid of its unit kernels, cropped to its shape. Tile (p, q) reads the q-th input block
of A^i and the p-th output block of B^i, so the stacked grid equals what a full-size generator would
emit; the gain is that all unit kernels of one shape, from convs of any width, are generated in one
batched matrix product.

Warm-up: `set_coefficient_temperature(inf)` makes lambda exactly uniform (KshotNAS / seed 000
NB201 recipe); annealing T from 30 to 1 is the ImageNet recipe. The dictionary is parametrised as
A_n = A_shared + A_delta_n (A_delta starts at 0): the same function class as N free copies, but the
shared part gets the full gradient instead of 1/N of it under uniform lambda, so warm-up trains.

Choices the paper leaves open (made for trainability, measured in benchmarks/ranking.py): z =
LN(z_shared + gate * mixer term) with the gate starting at 0, so training starts from plain weight
sharing and the arch dependence grows; and a fixed per-conv gain so that W starts at the stored
weight's scale and one SGD step moves it about as far as it moves a plain conv weight (without it
the three-factor product learns ~rank times faster than a conv and diverged at lr 0.05).

`build_supernet(space, hypernet={...})` (a training config's `supernet: {hypernet: {...}}`) attaches
`raynas.supernets.hypernet.KshotHypernet`, built from these parts, to any `TopologySupernet` (the
`nb201` and `uib` families).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raynas import config as c

# Paper values (Appendix A.1: h = 32, N = 64); rank None = h (the paper's z is h x h).
HYPERNET_DEFAULTS: dict[str, Any] = {
    "h": 32,              # architecture feature size
    "n": 64,              # K-shot dictionary size N
    "rank": None,         # rank of the weight decomposition (z is h x rank); None = h
    "unit": 16,           # unit kernel size in channels (0: one unit per conv, i.e. no stacking)
    "mixer_depth": 2,     # MLP-Mixer layers over the arch tokens
    "cab_reduction": 4,   # hidden size of the coefficient attention MLP = N / cab_reduction
}

def validate_hypernet_config(cfg: Mapping[str, Any] | None, where: str = "supernet.hypernet") -> dict[str, Any]:
    """The hypernet options with defaults filled in, or ConfigError naming the field."""
    out = c.with_defaults({} if cfg is True else cfg, HYPERNET_DEFAULTS, where)  # `hypernet: true`: the defaults
    minimum = {"h": 1, "n": 1, "rank": 1, "unit": 0, "mixer_depth": 0, "cab_reduction": 1}
    for key, low in minimum.items():
        c.integer(out[key], f"{where}.{key}", minimum=low, optional=key == "rank")  # rank None = h
    return out


# ---- the architecture network: MLP-Mixer -> (z, coefficient logits) --------------------------------
class MixerLayer(nn.Module):
    """One MLP-Mixer layer (Tolstikhin et al. 2021): token mixing, then channel mixing, pre-norm."""

    def __init__(self, tokens: int, channels: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.norm2 = nn.LayerNorm(channels)
        self.channel_mlp = nn.Sequential(nn.Linear(channels, 2 * channels), nn.GELU(),
                                         nn.Linear(2 * channels, channels))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # t: (tokens, channels)
        t = t + self.token_mlp(self.norm1(t).transpose(0, 1)).transpose(0, 1)
        return t + self.channel_mlp(self.norm2(t))


class CoefficientAttention(nn.Module):
    """CAB (seed 000 Fig. 4): CBAM's channel attention with the N coefficients as channels and the h
    features of each as its spatial extent; the attended features are reduced to one logit each."""

    def __init__(self, n: int, h: int, reduction: int):
        super().__init__()
        hidden = max(1, n // reduction)
        self.mlp = nn.Sequential(nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, n))
        self.to_logit = nn.Linear(h, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # features: (h, N) -> logits (N,)
        attention = torch.sigmoid(self.mlp(features.mean(0)) + self.mlp(features.amax(0)))
        return self.to_logit(features.transpose(0, 1)).squeeze(-1) * attention


class ArchFeatureNet(nn.Module):
    """f(alpha): arch encoding (one token per dimension, a distribution over its choices) -> (z, logits)."""

    def __init__(self, num_dims: int, max_choices: int, h: int, rank: int, n: int, depth: int, reduction: int):
        super().__init__()
        # Per-dimension choice embeddings: the same choice means different things in different dims.
        self.embed = nn.Parameter(torch.randn(num_dims, max_choices, h) / math.sqrt(max_choices))
        self.layers = nn.ModuleList(MixerLayer(num_dims, h) for _ in range(depth))
        self.norm = nn.LayerNorm(h)
        self.to_z = nn.Linear(num_dims, rank)        # token axis -> the rank columns of z (h x rank)
        # z = LN(z_shared + gate * arch term), gate starting at 0: training starts from plain weight sharing
        # (every arch gets the same z, as KshotNAS's equal-lambda warm-up starts from one supernet) and the
        # arch dependence grows as the gate learns; random per-arch z from the start trains far slower.
        self.z_shared = nn.Parameter(torch.randn(h, rank))
        self.z_gate = nn.Parameter(torch.zeros(()))
        self.to_coeff = nn.Linear(num_dims, n)       # token axis -> N coefficient channels (h x N)
        self.cab = CoefficientAttention(n, h, reduction)

    def forward(self, encoding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.einsum("dm,dmh->dh", encoding, self.embed)
        for layer in self.layers:
            t = layer(t)
        t = self.norm(t).transpose(0, 1)             # (h, tokens)
        z = self.z_shared + self.z_gate * self.to_z(t)
        z = F.layer_norm(z, z.shape)                 # unit-scale z: the slots' gains assume it
        return z, self.cab(self.to_coeff(t))


# ---- per-slot generators, stored as unit-kernel groups -----------------------------------------------
@dataclass(frozen=True)
class SlotLayout:
    """Where one conv slot's generator lives: its unit group, its blocks of A and B, its shape."""

    group: str
    in_rows: tuple[int, ...]     # rows of the group's A (one per input-channel block)
    out_rows: tuple[int, ...]    # rows of the group's B (one per output-channel block)
    shape: tuple[int, int, int, int]


def _unit(channels: int, unit: int) -> int:
    return channels if unit == 0 else min(unit, channels)


def unit_groups(slots: Mapping[str, nn.Module], unit: int) -> tuple[dict[str, dict[str, Any]], dict[str, SlotLayout]]:
    """Every slot's unit kernels grouped by unit shape; A and B rows are the slot's own (per-layer g^i).

    Returns the groups (unit shape, the stored weights' std per A row and per B row) and each slot's layout.
    """
    plans: dict[str, dict[str, Any]] = {}
    layouts: dict[str, SlotLayout] = {}
    for name, module in slots.items():
        shape = tuple(int(s) for s in module.weight.shape)
        c_out, c_in, kh, kw = shape
        u_out, u_in = _unit(c_out, unit), _unit(c_in, unit)
        key = f"u{u_out}x{u_in}x{kh}x{kw}"
        plan = plans.setdefault(key, {"u": (u_out, u_in, kh, kw), "in_sigma": [], "out_sigma": []})
        g_in, g_out = -(-c_in // u_in), -(-c_out // u_out)
        in_rows = tuple(range(len(plan["in_sigma"]), len(plan["in_sigma"]) + g_in))
        out_rows = tuple(range(len(plan["out_sigma"]), len(plan["out_sigma"]) + g_out))
        sigma = float(module.weight.detach().float().std()) if module.weight.numel() > 1 else 1.0
        plan["in_sigma"] += [sigma] * g_in
        plan["out_sigma"] += [sigma] * g_out
        layouts[name] = SlotLayout(key, in_rows, out_rows, shape)
    return plans, layouts


__all__ = ["HYPERNET_DEFAULTS", "ArchFeatureNet", "SlotLayout", "unit_groups", "validate_hypernet_config"]
