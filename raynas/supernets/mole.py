"""TAS-LoRA's MoLE supernet (seed 003 §3.3): a frozen AutoFormer supernet with LoRA experts and a router.

`build_supernet(space, mole={...})` attaches the experts (`raynas.nn.lora`: `MoLELinear`, `LSTMRouter`)
to every block's `qkv`, `proj`, `fc1`, `fc2` and to the classifier. The result is itself a `Supernet`:
`extract(arch)` routes once and merges the subnet's LoRA mixture into plain linear weights, so an
extracted subnet has exactly the base subnet's shapes, parameters and MACs. Its `build_option()` is
what a checkpoint stores, so `raynas.supernets.checkpoint.load_supernet` rebuilds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from raynas.errors import ConfigError
from raynas.nn.lora import BLOCK_TARGETS, FORWARD_MODES, LSTMRouter, MoLELinear, validate_mole_config
from raynas.space import Arch
from raynas.supernets.autoformer import AutoFormerSupernet
from raynas.supernets.base import Block, BuildOption, Supernet


def _replace(module: nn.Module, dotted: str, value: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(module.get_submodule(parent), leaf, value)


def _check_autoformer(supernet: Supernet) -> None:
    if isinstance(supernet, MoLESupernet) or (isinstance(supernet, AutoFormerSupernet)
                                             and isinstance(supernet.head, MoLELinear)):
        raise ConfigError("mole: this supernet already has MoLE experts")
    if not isinstance(supernet, AutoFormerSupernet):
        raise ConfigError(f"mole: applies to autoformer supernets (TAS-LoRA), not to '{supernet.space.family}'")


class MoLESupernet(Supernet, BuildOption):
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
                _replace(block, target, MoLELinear(block.get_submodule(target), num_experts, cfg["rank"], scale))
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
                block.get_submodule(target).gates = block_gates[i, j] if i < len(block_gates) else None
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
    def build_option(self) -> dict[str, Any]:
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


__all__ = ["MoLESupernet", "attach_mole"]
