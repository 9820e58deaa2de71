"""The supernet protocol shared by every family, and the static subnet it extracts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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

    def cost(self, arch: Arch) -> dict[str, int]:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def extract(self, arch: Mapping[str, Any], resolution: int | None = None) -> Subnet:
        arch = self.space.validate(arch)
        subnet = Subnet(self.blocks(arch, resolution), arch, self.space.name)
        subnet.train(self.training)
        return subnet
