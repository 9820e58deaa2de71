"""The supernet protocol shared by every family, and the static subnet it extracts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raynas.nn.dynamic import DynamicConv2d
from raynas.space import Arch, SearchSpace


@dataclass
class Block:
    """One sequential piece of an extracted subnet.

    `key` identifies the piece's configuration at its position (stage, input shape, choices): two
    pieces with equal keys are the same computation, which is what a latency lookup table indexes.
    `in_shape` is the input shape at batch 1.
    """

    key: str
    module: nn.Module
    in_shape: tuple[int, ...]


class Subnet(nn.Sequential):
    """A static subnet: its blocks run in order. Plain PyTorch, exportable to ONNX."""

    def __init__(self, blocks: list[Block], arch: Arch, space_name: str):
        super().__init__(*[b.module for b in blocks])
        self.arch_json = arch.to_json()
        self.space_name = space_name
        self.block_keys = [b.key for b in blocks]


@dataclass(frozen=True)
class StageSpec:
    """One row of a family's declared stage table: the stage's width and depth choices and, for a
    convolutional stage, its kernel and expansion choices and the stride of its first block."""

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    kernels: tuple[int, ...] = ()
    expansions: tuple[float, ...] = ()
    stride: int = 1

    @property
    def max_depth(self) -> int:
        return max(self.depths)


def declared_fields(cfg: Mapping[str, Any], resolution: int = 224, num_classes: int = 1000) -> dict[str, Any]:
    """The `SearchSpace` fields every family reads alike from a space declaration (family defaults given)."""
    return {"name": cfg["name"], "family": cfg["family"], "resolution": cfg.get("resolution", resolution),
            "num_classes": cfg.get("num_classes", num_classes), "in_channels": cfg.get("in_channels", 3),
            "config": dict(cfg)}


class Supernet(nn.Module):
    """Weight-sharing network holding every subnet of `space`.

    Families implement:
      * `forward(x, arch)`: the subnet `arch`; `arch=None` is the teacher / full network
        (largest subnet for size spaces; softmax(beta)-weighted op mixture for topology spaces).
      * `blocks(arch)`: the subnet as static `Block`s with inherited weights, in execution order.
      * `cost(arch)`: analytic {"params", "macs"} of the extracted subnet (MACs of conv, linear and
        attention matmuls; elementwise, normalisation and pooling ops are not counted).
    """

    space: SearchSpace

    def __init__(self, space: SearchSpace):
        super().__init__()
        self.space = space

    def input_shape(self, batch: int = 1, resolution: int | None = None) -> tuple[int, int, int, int]:
        r = resolution or self.space.resolution
        return (batch, self.space.in_channels, r, r)

    def as_arch(self, arch: Mapping[str, Any] | None) -> Arch | None:
        if arch is None or isinstance(arch, Arch):
            return arch
        return self.space.validate(arch)

    def forward(self, x: torch.Tensor, arch: Arch | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def blocks(self, arch: Arch, resolution: int | None = None) -> list[Block]:  # pragma: no cover
        raise NotImplementedError

    def cost(self, arch: Arch, resolution: int | None = None) -> dict[str, int]:  # pragma: no cover
        raise NotImplementedError

    def block_variants(self, resolution: int | None = None) -> list[Block]:
        """Every distinct block of the space at `resolution`, when the family can list them cheaply.

        A latency table profiles these instead of sampling subnets (raynas.hw.lut); [] means "sample".
        """
        return []

    @torch.no_grad()
    def extract(self, arch: Mapping[str, Any], resolution: int | None = None) -> Subnet:
        arch = self.space.validate(arch)
        subnet = Subnet(self.blocks(arch, resolution), arch, self.space.name)
        subnet.train(self.training)
        return subnet


class BuildOption(ABC):
    """A part that `build_supernet` adds on request (a Kshot-Hypernet, MoLE experts, a big/little pair).

    `build_option()` is the `build_supernet` keyword argument that rebuilds it; checkpoints store the
    options of every such part they hold, so `load_supernet` rebuilds the network before loading weights.
    """

    @abstractmethod
    def build_option(self) -> dict[str, Any]: ...


class Composite(ABC):
    """A network of several supernets trained together (a big/little pair), checkpointed as one.

    `deployable()` is the member whose subnets `raynas export` writes; `description` names the whole in
    messages. Checkpoints record the member's place, so it loads without the composite's own code.
    """

    description: str

    @abstractmethod
    def deployable(self) -> Supernet: ...


class ProgressiveShrinking(ABC):
    """A space whose dims fall into the groups of OFA's progressive shrinking (Cai et al. 2020).

    `progressive_groups()` maps a group name (e.g. kernel, depth, width) to the dims it releases, in the
    family's default order; dims in no group are elastic in every phase (as OFA's input resolution)."""

    @abstractmethod
    def progressive_groups(self) -> dict[str, tuple[str, ...]]: ...


class StageFeatures(ABC):
    """A supernet that can also return its stage outputs (feature distillation): `forward(x, arch,
    features=True)` is `forward_features(x, arch)` = (logits, [output of each stage]), going through
    `forward` so that a DDP wrapper sees the pass."""

    @abstractmethod
    def forward_features(self, x: torch.Tensor, arch: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, Any]: ...


def families_implementing(interface: type) -> list[str]:
    """The registered families whose module defines a class implementing `interface` (for error messages)."""
    from raynas.space.loader import FAMILIES

    out = []
    for family in FAMILIES.names():
        module = FAMILIES.find(family)
        if any(isinstance(v, type) and issubclass(v, interface) and v.__module__ == module.__name__
               for v in vars(module).values()):
            out.append(family)
    return out


# fn(arch, or None for the teacher) -> {conv slot name: full-size weight}; slots left out keep stored weights.
WeightGenerator = Callable[[Arch | None], Mapping[str, torch.Tensor]]


# (conv module) -> its full-size weight: the stored parameter or a generated tensor (one forward's choice)
WeightFetch = Callable[[DynamicConv2d], torch.Tensor]


def stored_weight(conv: DynamicConv2d) -> torch.Tensor:
    return conv.weight


def slot_weight(generated: Mapping[str, torch.Tensor], slot: str, stored: torch.Tensor) -> torch.Tensor:
    """The weight of conv `slot`: the generated tensor when the generator supplied one, else the stored one."""
    weight = generated.get(slot)
    if weight is None:
        return stored
    if tuple(weight.shape) != tuple(stored.shape):
        raise ValueError(f"weight generator: '{slot}' needs shape {tuple(stored.shape)}, got {tuple(weight.shape)}")
    return weight


class TopologySupernet(Supernet, ABC):
    """A supernet of a topology space: each topology dimension picks one op among `op_names()`.

    This is what FocusFair sampling and the Kshot-Hypernet need (seed 000). `arch_params` (beta) has
    one row per topology dimension, one column per op.
    """

    arch_params: torch.nn.Parameter

    @abstractmethod
    def op_names(self) -> tuple[str, ...]:
        """Columns of `arch_params`."""

    @abstractmethod
    def topology_dims(self) -> tuple[str, ...]:
        """Arch fields holding an op choice: rows of `arch_params`, in execution order."""

    def arch_weights(self, temperature: float = 1.0) -> torch.Tensor:
        """softmax(beta / tau), (dims, ops): the teacher's op mixture at tau = 1, FocusFair's sampling
        weights at tau ~ 1.5."""
        return torch.softmax(self.arch_params / temperature, dim=-1)

    def name_conv_slots(self) -> None:
        """Make every conv of the built network a weight slot named by its qualified name (call once, at the
        end of `__init__`: a generator registered later is no part of the network it generates for)."""
        self._convs: dict[str, DynamicConv2d] = {}
        for qualname, module in self.named_modules():
            if isinstance(module, DynamicConv2d):
                module.slot_name = qualname
                self._convs[qualname] = module

    def conv_slots(self) -> dict[str, DynamicConv2d]:
        """Every conv by slot name; its `weight.shape` is what a weight generator returns."""
        return dict(self._convs)

    @abstractmethod
    def active_conv_slots(self, arch: Mapping[str, Any]) -> list[str]:
        """Slot names of the convs the single-path subnet `arch` runs."""

    def set_weight_generator(self, generator: WeightGenerator | None) -> None:
        """Let `generator(arch)` supply conv weights by slot name (None: stored weights again).

        An `nn.Module` generator is registered as the submodule `weight_generator`, so its parameters
        train, move and checkpoint with the supernet.
        """
        self._modules.pop("weight_generator", None)
        if isinstance(generator, nn.Module):
            self.add_module("weight_generator", generator)
        self.__dict__["_weight_generator"] = generator  # not an attribute nn.Module would register twice

    def weight_fetch(self, arch: Arch | None) -> WeightFetch:
        """The conv weights of one forward or extraction of `arch` (None: the teacher): the generator's
        where it supplies them (asked once), the stored ones elsewhere."""
        generator = self.__dict__.get("_weight_generator")
        generated = {} if generator is None else generator(arch)
        return lambda conv: slot_weight(generated, conv.slot_name, conv.weight)
