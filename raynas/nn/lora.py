"""Mixture-of-LoRA-Experts for weight-entangled ViT supernets (seed 003, TAS-LoRA §3.3).

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

`attach_mole(supernet, config)` wraps an AutoFormer supernet into a `MoLESupernet` (itself a
`Supernet`: forward / blocks / extract / cost). `build_supernet_with_mole(space, mole=...)` and
`mole_kwargs(net)` are what a checkpoint needs to rebuild one; `load_mole_supernet(path)` does that.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raynas.errors import ConfigError
from raynas.nn.dynamic import DynamicLinear
from raynas.space import Arch
from raynas.supernets.base import Block, Supernet

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
    config = dict(config or {})
    for key in config:
        if key not in MOLE_DEFAULTS:
            raise ConfigError(f"{where}: unknown field '{key}'; allowed: {sorted(MOLE_DEFAULTS)}")
    out = {**MOLE_DEFAULTS, **config}
    for key in ("rank", "router_embed", "router_hidden"):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 1:
            raise ConfigError(f"{where}.{key}: expected an integer >= 1, got {out[key]!r}")
    if not isinstance(out["num_experts"], int) or isinstance(out["num_experts"], bool) or out["num_experts"] < 0:
        raise ConfigError(f"{where}.num_experts: expected an integer >= 0 (0: one per group), "
                          f"got {out['num_experts']!r}")
    for key in ("alpha", "init_bias"):
        value = out[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(f"{where}.{key}: expected a number, got {value!r}")
        out[key] = float(value)
    if out["alpha"] <= 0:
        raise ConfigError(f"{where}.alpha: expected a number > 0, got {out['alpha']!r}")
    if out["router_init"] not in ROUTER_INITS:
        raise ConfigError(f"{where}.router_init: {out['router_init']!r} is not allowed; allowed: {list(ROUTER_INITS)}")
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
            raise ConfigError(f"mole.router_init: {init!r} is not allowed; allowed: {list(ROUTER_INITS)}")

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


# ---- the MoLE supernet ---------------------------------------------------------------------------------
def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, dotted: str, value: nn.Module) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        module = getattr(module, part)
    setattr(module, leaf, value)


def _check_autoformer(supernet: nn.Module) -> None:
    space = getattr(supernet, "space", None)
    if space is None or space.family != "autoformer" or not hasattr(supernet, "layers"):
        family = getattr(space, "family", type(supernet).__name__)
        raise ConfigError(f"mole: applies to autoformer supernets (TAS-LoRA), not to '{family}'")
    if isinstance(supernet, MoLESupernet) or isinstance(supernet.head, MoLELinear):
        raise ConfigError("mole: this supernet already has MoLE experts")


class MoLESupernet(Supernet):
    """A frozen AutoFormer supernet + LoRA experts + LSTM router, honouring the Supernet protocol.

    `forward(x, arch)` routes `arch` and runs the supernet with its MoLE layers; `blocks(arch)` (and
    so `extract(arch)`) routes once and returns the supernet's static blocks with LoRA merged into
    their weights; `cost(arch)` is the base subnet's, since merging changes no shape.
    """

    def __init__(self, supernet: Supernet, config: Mapping[str, Any] | None = None):
        _check_autoformer(supernet)
        super().__init__(supernet.space)
        cfg = self.config = validate_mole_config(config)
        spec = supernet.space.spec
        groups = len(spec.num_heads) * len(spec.mlp_ratios) * len(spec.embed_dims)
        num_experts = cfg["num_experts"] or groups
        self.router = LSTMRouter(spec.num_heads, spec.mlp_ratios, spec.embed_dims, num_experts=num_experts,
                                 embed=cfg["router_embed"], hidden=cfg["router_hidden"], init=cfg["router_init"],
                                 init_bias=cfg["init_bias"])
        scale = cfg["alpha"] / cfg["rank"]
        for block in supernet.layers:
            for target in BLOCK_TARGETS:
                _set(block, target, MoLELinear(_get(block, target), num_experts, cfg["rank"], scale))
        supernet.head = MoLELinear(supernet.head, num_experts, cfg["rank"], scale)
        self.supernet = supernet
        self.num_experts = num_experts
        self.router_frozen = False
        for name, p in supernet.named_parameters():  # fine-tuning trains the experts and the router only
            p.requires_grad_(name.endswith(("lora_a", "lora_b")))

    # ---- parameters --------------------------------------------------------------------------------
    def mole_layers(self) -> list[MoLELinear]:
        return [m for m in self.supernet.modules() if isinstance(m, MoLELinear)]

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.mole_layers() for p in (m.lora_a, m.lora_b)]

    def router_parameters(self) -> list[nn.Parameter]:
        return list(self.router.parameters())

    def base_parameters(self) -> list[nn.Parameter]:
        lora = {id(p) for p in self.lora_parameters()}
        return [p for p in self.supernet.parameters() if id(p) not in lora]

    def set_router_frozen(self, frozen: bool) -> None:
        """Frozen: routing weights carry no gradient (TAS-LoRA's warm-up trains the experts only)."""
        self.router_frozen = bool(frozen)

    def set_forward_mode(self, mode: str) -> None:
        if mode not in FORWARD_MODES:
            raise ValueError(f"forward mode {mode!r}; allowed: {list(FORWARD_MODES)}")
        for m in self.mole_layers():
            m.forward_mode = mode

    # ---- routing -------------------------------------------------------------------------------------
    def block_attributes(self, arch: Mapping[str, Any]) -> list[tuple[int, float, int]]:
        return self.supernet.block_attributes(arch)

    def routing(self, arch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(block gates (depth, 4, E), classifier gates (E,)) of a subnet."""
        attributes = self.block_attributes(arch)
        if self.router_frozen:
            with torch.no_grad():
                return self.router(attributes)
        return self.router(attributes)

    def _route(self, arch: Arch) -> None:
        block_gates, head_gates = self.routing(arch)
        for i, block in enumerate(self.supernet.layers):
            for j, target in enumerate(BLOCK_TARGETS):
                _get(block, target).gates = block_gates[i, j] if i < len(block_gates) else None
        self.supernet.head.gates = head_gates

    def _clear_routes(self) -> None:
        # The autograd graph keeps its own references; dropping ours keeps the module deep-copyable.
        for m in self.mole_layers():
            m.gates = None

    # ---- protocol -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, arch: Arch | Mapping[str, Any] | None = None) -> torch.Tensor:
        arch = self.space.max_arch() if arch is None else self.as_arch(arch)
        self._route(arch)
        try:
            return self.supernet(x, arch)
        finally:
            self._clear_routes()

    @torch.no_grad()
    def blocks(self, arch: Arch, resolution: int | None = None) -> list[Block]:
        arch = self.space.validate(arch)
        self._route(arch)
        try:
            return self.supernet.blocks(arch, resolution)
        finally:
            self._clear_routes()

    def cost(self, arch: Arch, resolution: int | None = None) -> dict[str, int]:
        return self.supernet.cost(arch, resolution)

    # ---- what a checkpoint needs --------------------------------------------------------------------------
    def supernet_kwargs(self) -> dict[str, Any]:
        """The `build_supernet` keyword arguments that rebuild this network (before its weights)."""
        return {"mole": dict(self.config)}

    def get_extra_state(self) -> dict[str, Any]:
        # Travels inside state_dict(), so a saved MoLE supernet says how to rebuild itself.
        return {"mole": dict(self.config)}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, Mapping) and "mole" in state:
            saved = validate_mole_config(state["mole"])
            if saved != self.config:
                raise ValueError(f"MoLE checkpoint was built with {saved}, this network with {self.config}")


def attach_mole(supernet: Supernet, config: Mapping[str, Any] | None = None) -> MoLESupernet:
    """Freeze `supernet` (an AutoFormer one, trained) and add TAS-LoRA's experts and router.

    The supernet's `DynamicLinear`s are replaced in place by `MoLELinear`s that share their
    Parameters; the returned `MoLESupernet` owns the supernet (as `.supernet`) and the router.
    """
    return MoLESupernet(supernet, config)


def find_mole(module: nn.Module) -> MoLESupernet | None:
    """The MoLE supernet inside a module (e.g. under DDP), if any."""
    for m in module.modules():
        if isinstance(m, MoLESupernet):
            return m
    return None


def mole_kwargs(module: nn.Module) -> dict[str, Any]:
    """`build_supernet` kwargs that rebuild `module`'s MoLE parts ({} without any)."""
    net = find_mole(module)
    return {} if net is None else net.supernet_kwargs()


def build_supernet_with_mole(space, **kwargs: Any) -> Supernet:
    """`raynas.supernets.build_supernet` plus the `mole={...}` option (None / absent: no MoLE)."""
    from raynas.supernets import build_supernet

    config = kwargs.pop("mole", None)
    supernet = build_supernet(space, **kwargs)
    return supernet if config is None else attach_mole(supernet, config)


def load_mole_supernet(path: str | Path | bytes, mole: Mapping[str, Any] | None = None) -> MoLESupernet:
    """Rebuild a saved MoLE supernet (space, frozen base, experts, router) in eval mode.

    The MoLE config comes from `mole`, else the checkpoint's `supernet_kwargs`, else the config the
    network stored in its own state dict.
    """
    from raynas.space import space_from_config
    from raynas.supernets.checkpoint import CheckpointError, read_checkpoint

    state = read_checkpoint(path)
    config = mole or state.get("supernet_kwargs", {}).get("mole")
    if config is None:
        extra = state["model"].get("_extra_state")
        config = extra.get("mole") if isinstance(extra, Mapping) else None
    if config is None:
        raise CheckpointError("checkpoint: holds no MoLE supernet (no 'mole' config stored)")
    kwargs = {k: v for k, v in state.get("supernet_kwargs", {}).items() if k != "mole"}
    net = build_supernet_with_mole(space_from_config(state["space_config"]), mole=config, **kwargs)
    net.load_state_dict(state["model"])
    return net.eval()


__all__ = ["BLOCK_TARGETS", "LSTMRouter", "MOLE_DEFAULTS", "MoLELinear", "MoLESupernet", "attach_mole",
           "build_supernet_with_mole", "find_mole", "load_mole_supernet", "mole_kwargs", "validate_mole_config"]
