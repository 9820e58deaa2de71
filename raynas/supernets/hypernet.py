"""The Kshot-Hypernet of a topology supernet (seed 000, §3.1-3.2): conv weights generated from the arch.

The generator's parts (the MLP-Mixer arch network, unit-kernel groups, the method's notes) are in
`raynas.nn.hyper`; this module attaches one to a `TopologySupernet` (raynas.supernets.base): it reads the
supernet's conv slots and topology dimensions, becomes its weight generator, and is the `hypernet` build
option a checkpoint stores. The teacher (arch None) is encoded with softmax(beta) on its topology
dimensions (detached: beta learns from the teacher's mixture only) and the largest choice elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from raynas.errors import ConfigError
from raynas.nn.hyper import ArchFeatureNet, unit_groups, validate_hypernet_config
from raynas.space import Arch
from raynas.supernets.base import BuildOption, TopologySupernet


def topology_dims(supernet: TopologySupernet) -> tuple[str, ...]:
    """Arch dimensions holding an op choice, in the row order of `arch_params` (beta)."""
    return tuple(supernet.topology_dims())


def check_topology_supernet(supernet: nn.Module, what: str) -> None:
    """Refuse supernets of size-only spaces: they declare no topology interface (beta, ops, conv slots)."""
    if not isinstance(supernet, TopologySupernet):
        space = supernet.space
        raise ConfigError(f"{what}: space '{space.name}' (family '{space.family}') is not a topology space "
                          "(no op choices with arch_params); allowed families: ['nb201', 'uib']")


class KshotHypernet(nn.Module, BuildOption):
    """Generates conv weights {slot name: tensor} for an arch (None: the teacher); see the module doc."""

    def __init__(self, supernet: TopologySupernet, config: Mapping[str, Any] | None = None):
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

        plans, layouts = unit_groups(supernet.conv_slots(), unit)
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

    def build_option(self) -> dict[str, Any]:
        return {"hypernet": dict(self.config)}

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


__all__ = ["KshotHypernet", "attach_hypernet", "check_topology_supernet", "find_hypernet", "topology_dims"]
