"""Kshot-Hypernet (seed 000, §3.1-3.2): conv weights generated from the architecture.

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

`build_supernet(space, hypernet={...})` (a training config's `supernet: {hypernet: {...}}`) calls
`attach_hypernet(supernet, cfg)`, which works on any supernet with the weight-generator hooks of the
`nb201` and `uib` families (`conv_slots`, `active_conv_slots`, `set_weight_generator`, `arch_params`).
The teacher (arch None) is encoded with softmax(beta) on its topology dimensions (detached: beta
learns from the teacher's mixture only) and the largest choice elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raynas.errors import ConfigError
from raynas.space import Arch

# Paper values (Appendix A.1: h = 32, N = 64); rank None = h (the paper's z is h x h).
HYPERNET_DEFAULTS: dict[str, Any] = {
    "h": 32,              # architecture feature size
    "n": 64,              # K-shot dictionary size N
    "rank": None,         # rank of the weight decomposition (z is h x rank); None = h
    "unit": 16,           # unit kernel size in channels (0: one unit per conv, i.e. no stacking)
    "mixer_depth": 2,     # MLP-Mixer layers over the arch tokens
    "cab_reduction": 4,   # hidden size of the coefficient attention MLP = N / cab_reduction
}

HOOKS = ("conv_slots", "active_conv_slots", "set_weight_generator", "arch_params")


def validate_hypernet_config(cfg: Mapping[str, Any] | None, where: str = "supernet.hypernet") -> dict[str, Any]:
    """The hypernet options with defaults filled in, or ConfigError naming the field."""
    if cfg is None or cfg is True:
        cfg = {}
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{where}: expected a mapping of options {sorted(HYPERNET_DEFAULTS)}, got {cfg!r}")
    for key in cfg:
        if key not in HYPERNET_DEFAULTS:
            raise ConfigError(f"{where}: unknown field '{key}'; allowed: {sorted(HYPERNET_DEFAULTS)}")
    out = {**HYPERNET_DEFAULTS, **dict(cfg)}
    minimum = {"h": 1, "n": 1, "rank": 1, "unit": 0, "mixer_depth": 0, "cab_reduction": 1}
    for key, low in minimum.items():
        value = out[key]
        if key == "rank" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{where}.{key}: expected an integer >= {low}, got {value!r}")
    return out


def topology_dims(supernet: nn.Module) -> tuple[str, ...]:
    """Arch dimensions holding an op choice, in the row order of `arch_params` (beta)."""
    if hasattr(supernet, "topology_dims"):
        return tuple(supernet.topology_dims())
    if hasattr(supernet, "edge_names"):
        return tuple(supernet.edge_names())
    raise ConfigError(f"supernet of space '{supernet.space.name}' (family '{supernet.space.family}') has no "
                      "topology dimensions (arch_params rows)")


def check_topology_supernet(supernet: nn.Module, what: str) -> None:
    """Refuse supernets without the topology hooks (beta, op names, weight-generator slots)."""
    missing = [h for h in ("arch_params", "op_names", "arch_weights") if not hasattr(supernet, h)]
    if what == "supernet.hypernet":
        missing += [h for h in HOOKS if not hasattr(supernet, h) and h not in missing]
    if missing:
        space = supernet.space
        raise ConfigError(f"{what}: space '{space.name}' (family '{space.family}') is not a topology space "
                          f"with {sorted(set(missing))}; allowed families: ['nb201', 'uib']")


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


class KshotHypernet(nn.Module):
    """Generates conv weights {slot name: tensor} for an arch (None: the teacher); see the module doc."""

    def __init__(self, supernet: nn.Module, config: Mapping[str, Any] | None = None):
        super().__init__()
        check_topology_supernet(supernet, "supernet.hypernet")
        cfg = validate_hypernet_config(config)
        self.config = cfg
        h, n, unit = cfg["h"], cfg["n"], cfg["unit"]
        rank = cfg["rank"] or h
        space = supernet.space
        self.dim_names = tuple(d.name for d in space.dims)
        self.dim_choices = tuple(tuple(d.choices) for d in space.dims)
        self.topology = topology_dims(supernet)
        ops = tuple(supernet.op_names())
        for name in self.topology:
            choices = self.dim_choices[self.dim_names.index(name)]
            if tuple(choices) != ops:
                raise ConfigError(f"supernet.hypernet: dimension '{name}' choices {list(choices)} differ "
                                  f"from the supernet's op columns {list(ops)}")
        self.max_choices = max(len(c) for c in self.dim_choices)
        self.features = ArchFeatureNet(len(self.dim_names), self.max_choices, h, rank, n,
                                       cfg["mixer_depth"], cfg["cab_reduction"])
        self.register_buffer("coefficient_temperature", torch.tensor(1.0))

        # Group every slot's unit kernels by unit shape; A and B rows are the slot's own (per-layer g^i).
        slots = supernet.conv_slots()
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
        self.layouts = layouts
        self.a_shared = nn.ParameterDict()
        self.a_delta = nn.ParameterDict()
        self.b = nn.ParameterDict()
        self.unit_shapes: dict[str, tuple[int, int, int, int]] = {}
        # Scales (sigma = the stored weight's std, z has unit entries, W = gain * A^T z B): A and B ~
        # N(0, 2 sigma^2) and gain = 1 / (2 sigma sqrt(h * rank)) give W the stored init scale AND make an
        # SGD step move W about as much as it moves a plain conv weight (the A and B paths each
        # contribute half). Without the gain the product's effective learning rate is ~rank times a
        # plain conv's, and training diverges. The gains are buffers: a checkpoint restores them exactly.
        for key in sorted(plans):
            plan = plans[key]
            u_out, u_in, kh, kw = plan["u"]
            self.unit_shapes[key] = plan["u"]
            sigma_in = torch.tensor(plan["in_sigma"]).view(-1, 1, 1)
            sigma_out = torch.tensor(plan["out_sigma"])
            self.a_shared[key] = nn.Parameter(torch.randn(len(plan["in_sigma"]), h, u_in) * math.sqrt(2) * sigma_in)
            self.a_delta[key] = nn.Parameter(torch.zeros(len(plan["in_sigma"]), n, h, u_in))
            self.b[key] = nn.Parameter(torch.randn(len(sigma_out), rank, u_out * kh * kw)
                                       * math.sqrt(2) * sigma_out.view(-1, 1, 1))
            self.register_buffer(f"gain_{key}", 1.0 / (2.0 * sigma_out * math.sqrt(h * rank)))
        self.n = n
        self._index_cache: dict[tuple[str, ...], dict[str, Any]] = {}
        self._eval_cache: dict[Any, tuple[Any, dict[str, torch.Tensor]]] = {}
        # The host supernet (not a submodule: no cycle in modules()/state_dict; deepcopy keeps it consistent).
        self.__dict__["_host"] = supernet

    # ---- coefficients and encoding ---------------------------------------------------------------
    def set_coefficient_temperature(self, temperature: float) -> None:
        """lambda = softmax(logits / T); T = inf gives exactly equal coefficients (warm-up)."""
        if not temperature > 0:
            raise ValueError(f"coefficient temperature must be > 0, got {temperature}")
        self.coefficient_temperature.fill_(float(temperature))

    def encode(self, arch: Mapping[str, Any] | None) -> torch.Tensor:
        """(dims, max_choices): one-hot of each choice; the teacher (None) has softmax(beta) rows on its
        topology dims and its (largest) size choice elsewhere."""
        device = self.features.embed.device
        enc = torch.zeros(len(self.dim_names), self.max_choices, device=device)
        if arch is None:
            beta = self.__dict__["_host"].arch_weights().detach().to(device, torch.float32)
            rows = dict(zip(self.topology, beta))
            for d, (name, choices) in enumerate(zip(self.dim_names, self.dim_choices)):
                if name in rows:
                    enc[d, :len(choices)] = rows[name]
                else:
                    enc[d, len(choices) - 1] = 1.0
            return enc
        for d, (name, choices) in enumerate(zip(self.dim_names, self.dim_choices)):
            enc[d, choices.index(arch[name])] = 1.0
        return enc

    def coefficients(self, logits: torch.Tensor) -> torch.Tensor:
        t = float(self.coefficient_temperature)
        if math.isinf(t):
            return torch.full_like(logits, 1.0 / logits.numel())
        return torch.softmax(logits / t, dim=-1)

    def arch_features(self, arch: Mapping[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, lambda) of an arch."""
        z, logits = self.features(self.encode(arch))
        return z, self.coefficients(logits)

    # ---- generation ------------------------------------------------------------------------------
    def _indices(self, names: tuple[str, ...], device: torch.device) -> dict[str, Any]:
        """Gather indices per unit group for a set of slots (cached: subnets repeat their slot sets)."""
        cached = self._index_cache.get(names)
        if cached is not None and cached["device"] == device:
            return cached
        groups: dict[str, dict[str, list]] = {}
        for name in names:
            lay = self.layouts[name]
            g = groups.setdefault(lay.group, {"in": [], "tile_in": [], "tile_out": [], "slots": []})
            first_in = len(g["in"])
            g["in"] += lay.in_rows
            start = len(g["tile_out"])
            for p in lay.out_rows:
                for q in range(len(lay.in_rows)):
                    g["tile_out"].append(p)
                    g["tile_in"].append(first_in + q)
            g["slots"].append((name, start, len(g["tile_out"]), len(lay.out_rows), len(lay.in_rows), lay.shape))
        out = {"device": device, "groups": {
            key: {"in": torch.tensor(g["in"], device=device), "tile_in": torch.tensor(g["tile_in"], device=device),
                  "tile_out": torch.tensor(g["tile_out"], device=device), "slots": g["slots"]}
            for key, g in groups.items()}}
        if len(self._index_cache) > 4096:
            self._index_cache.clear()
        self._index_cache[names] = out
        return out

    def generate(self, arch: Mapping[str, Any] | None, slots: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Weights of `slots` (default: those `arch` runs; all for the teacher) for `arch`."""
        if slots is None:
            host = self.__dict__["_host"]
            slots = list(self.layouts) if arch is None else host.active_conv_slots(arch)
        names = tuple(slots)
        z, lam = self.arch_features(arch)
        index = self._indices(names, z.device)
        weights: dict[str, torch.Tensor] = {}
        for key, g in index["groups"].items():
            u_out, u_in, kh, kw = self.unit_shapes[key]
            a = self.a_shared[key].index_select(0, g["in"])
            a = a + torch.einsum("n,qnhc->qhc", lam, self.a_delta[key].index_select(0, g["in"]))
            y = torch.einsum("qhc,hr->qcr", a, z)                                   # (blocks_in, u_in, rank)
            tiles = torch.bmm(y.index_select(0, g["tile_in"]), self.b[key].index_select(0, g["tile_out"]))
            tiles = tiles * getattr(self, f"gain_{key}").index_select(0, g["tile_out"]).view(-1, 1, 1)
            for name, start, end, g_out, g_in, (c_out, c_in, _, _) in g["slots"]:
                grid = tiles[start:end].view(g_out, g_in, u_in, u_out, kh, kw)
                full = grid.permute(0, 3, 1, 2, 4, 5).reshape(g_out * u_out, g_in * u_in, kh, kw)
                weights[name] = full[:c_out, :c_in]
        return weights

    def _cache_key(self, arch: Mapping[str, Any] | None) -> Any:
        host = self.__dict__["_host"]
        versions = tuple(t._version for t in (*self.parameters(), *self.buffers(), host.arch_params))
        return (arch, float(self.coefficient_temperature), versions)

    def forward(self, arch: Arch | None) -> Mapping[str, torch.Tensor]:
        """The supernet's weight-generator hook. Without gradients (evaluation, BN recalibration,
        extraction) an arch's weights are reused until a parameter changes."""
        if torch.is_grad_enabled():
            self._eval_cache.clear()
            return self.generate(arch)
        key = self._cache_key(arch)
        hit = self._eval_cache.get(arch)
        if hit is not None and hit[0] == key:
            return hit[1]
        weights = self.generate(arch)
        if len(self._eval_cache) > 64:
            self._eval_cache.clear()
        self._eval_cache[arch] = (key, weights)
        return weights

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"h={cfg['h']}, n={cfg['n']}, rank={cfg['rank'] or cfg['h']}, unit={cfg['unit']}, "
                f"slots={len(self.layouts)}, unit_groups={len(self.unit_shapes)}")


def attach_hypernet(supernet: nn.Module, config: Mapping[str, Any] | None = None) -> KshotHypernet:
    """Make `supernet`'s conv weights come from a new Kshot-Hypernet (registered as the submodule
    `weight_generator`: it trains, moves and checkpoints with the supernet). Returns it."""
    hypernet = KshotHypernet(supernet, config)
    supernet.set_weight_generator(hypernet)
    return hypernet


def find_hypernet(module: nn.Module) -> KshotHypernet | None:
    """The Kshot-Hypernet attached to a supernet (or to a module wrapping one), if any."""
    for m in module.modules():
        if isinstance(m, KshotHypernet):
            return m
    return None


def hypernet_kwargs(supernet: nn.Module) -> dict[str, Any]:
    """The `build_supernet` keyword arguments that rebuild `supernet`'s hypernet ({} without one):
    what a checkpoint must store as `supernet_kwargs`."""
    hypernet = find_hypernet(supernet)
    return {} if hypernet is None else {"hypernet": dict(hypernet.config)}


__all__ = ["HYPERNET_DEFAULTS", "KshotHypernet", "attach_hypernet", "check_topology_supernet", "find_hypernet",
           "hypernet_kwargs", "topology_dims", "validate_hypernet_config"]
