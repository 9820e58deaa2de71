"""NAS-Bench-201 building blocks: the supernet's modules and the static modules they extract to.

The static modules reproduce the benchmark's inference network (`TinyNetwork`, `InferCell`,
`ReLUConvBN`, `ResNetBasicblock` of NAS-Bench-201 / xautodl) layer for layer, so an extracted
subnet has exactly the benchmark's parameter count.

Every convolution of the supernet is a shared `DynamicConv2d` (raynas.nn) at one fixed size, initialised
as nn.Conv2d is, and reads its weight through a `fetch(conv)` callable (raynas.supernets.base): that
is how a weight generator (the Kshot-Hypernet of seed 000) supplies arch-conditioned conv weights
without the supernet being rewritten.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raynas.nn.dynamic import DynamicConv2d, conv2d_default_init
from raynas.nn.layers import DynamicConvNormAct
from raynas.supernets.base import WeightFetch, stored_weight

# Operation names as the benchmark spells them (its arch strings use these), in its canonical order.
OP_NAMES = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
CONV_KERNELS = {"nor_conv_1x1": 1, "nor_conv_3x3": 3}
# Cheapest first: decides the smallest and largest cell (sandwich rule) for any subset of the ops.
OP_COST_RANK = ("none", "skip_connect", "avg_pool_3x3", "nor_conv_1x1", "nor_conv_3x3")


class ReLUConvBN(DynamicConvNormAct):
    """The benchmark's `nor_conv` op: ReLU -> Conv (no bias) -> BatchNorm (affine, tracked stats), i.e. the
    shared conv-norm unit at its one size, pre-activated."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1):
        super().__init__(c_in, c_out, kernel, stride, init=conv2d_default_init)  # as the benchmark trained

    def forward(self, x: torch.Tensor, fetch: WeightFetch = stored_weight) -> torch.Tensor:
        return super().forward(F.relu(x), weight=fetch(self.conv))

    def static(self, fetch: WeightFetch = stored_weight) -> nn.Sequential:
        return nn.Sequential(nn.ReLU(), *super().static(self.conv.max_in, weight=fetch(self.conv)))


def stem(c_in: int, c_out: int) -> DynamicConvNormAct:
    """Conv3x3 (no bias) -> BN, the benchmark's stem."""
    return DynamicConvNormAct(c_in, c_out, 3, init=conv2d_default_init)


class Zero(nn.Module):
    """The `none` op: zeros of the input's shape. `x * 0.0` (not a constant) keeps shapes dynamic in ONNX."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.0


def avg_pool_3x3() -> nn.AvgPool2d:
    # The benchmark's POOLING op excludes the zero padding from the average.
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class SuperCell(nn.Module):
    """All candidate ops of every edge of one cell (C channels in and out, stride 1).

    `edges[e]` holds the modules of edge e: `skip_connect` and `avg_pool_3x3` are parameter-free,
    `none` has no module at all (its output is zero, so it is simply left out of a node's sum).
    """

    def __init__(self, channels: int, edges: Sequence[tuple[int, int]], ops: Sequence[str]):
        super().__init__()
        self.channels = channels
        self.edge_list = tuple(edges)
        self.num_nodes = max(j for j, _ in self.edge_list) + 1
        self.ops = tuple(ops)
        self.edges = nn.ModuleList()
        for _ in self.edge_list:
            candidates = nn.ModuleDict()
            for op in self.ops:
                if op in CONV_KERNELS:
                    candidates[op] = ReLUConvBN(channels, channels, CONV_KERNELS[op])
                elif op == "avg_pool_3x3":
                    candidates[op] = avg_pool_3x3()
                elif op == "skip_connect":
                    candidates[op] = nn.Identity()
            self.edges.append(candidates)

    def _run(self, e: int, op: str, x: torch.Tensor, fetch: WeightFetch) -> torch.Tensor:
        module = self.edges[e][op]
        return module(x, fetch) if isinstance(module, ReLUConvBN) else module(x)

    def _cell(self, x: torch.Tensor, edge_out) -> torch.Tensor:
        """Node j sums its incoming edges in ascending source order (as the static cell does)."""
        nodes = [x]
        for j in range(1, self.num_nodes):
            total = None
            for e, (to, src) in enumerate(self.edge_list):
                if to != j:
                    continue
                y = edge_out(e, nodes[src])
                if y is not None:
                    total = y if total is None else total + y
            nodes.append(torch.zeros_like(x) if total is None else total)
        return nodes[-1]

    def forward(self, x: torch.Tensor, ops: Sequence[str], fetch: WeightFetch = stored_weight):
        """Single path: `ops[e]` is the op of edge e."""
        return self._cell(x, lambda e, h: None if ops[e] == "none" else self._run(e, ops[e], h, fetch))

    def forward_mixture(self, x: torch.Tensor, alphas: torch.Tensor,
                        fetch: WeightFetch = stored_weight) -> torch.Tensor:
        """DARTS mixture: edge e outputs sum_o alphas[e, o] * op_o(x) (seed 000, eq. 5)."""

        def mixed(e: int, h: torch.Tensor) -> torch.Tensor | None:
            total = None
            for o, op in enumerate(self.ops):
                if op == "none":
                    continue
                y = alphas[e, o] * self._run(e, op, h, fetch)
                total = y if total is None else total + y
            return total

        return self._cell(x, mixed)

    def static(self, ops: Sequence[str], fetch: WeightFetch = stored_weight) -> InferCell:
        layers = []
        for e, op in enumerate(ops):
            if op == "none":
                layers.append(Zero())
            elif op in CONV_KERNELS:
                layers.append(self.edges[e][op].static(fetch))
            elif op == "avg_pool_3x3":
                layers.append(avg_pool_3x3())
            else:
                layers.append(nn.Identity())
        return InferCell(self.edge_list, layers)


class InferCell(nn.Module):
    """A static cell with one op per edge (the benchmark's `InferCell`, every edge kept).

    Edges into dead-end nodes and `none` ops are kept, as the benchmark keeps them, so parameter and
    FLOP counts equal its published ones.
    """

    def __init__(self, edges: Sequence[tuple[int, int]], layers: Sequence[nn.Module]):
        super().__init__()
        self.edge_list = tuple(edges)
        self.num_nodes = max(j for j, _ in self.edge_list) + 1
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for j in range(1, self.num_nodes):
            total = None
            for (to, src), layer in zip(self.edge_list, self.layers):
                if to == j:
                    y = layer(nodes[src])
                    total = y if total is None else total + y
            nodes.append(total)
        return nodes[-1]


class ResNetReduction(nn.Module):
    """The benchmark's `ResNetBasicblock(C_in, C_out, stride=2)` between stages (fixed, not searched).

    conv_a: ReLU-Conv3x3(s2)-BN, conv_b: ReLU-Conv3x3-BN, shortcut: AvgPool2x2 -> Conv1x1 (no BN).
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv_a = ReLUConvBN(c_in, c_out, 3, stride=2)
        self.conv_b = ReLUConvBN(c_out, c_out, 3)
        self.shortcut = DynamicConv2d(c_in, c_out, 1, init=conv2d_default_init)

    def forward(self, x: torch.Tensor, fetch: WeightFetch = stored_weight) -> torch.Tensor:
        residual = self.shortcut(F.avg_pool2d(x, 2, 2), weight=fetch(self.shortcut))
        return residual + self.conv_b(self.conv_a(x, fetch), fetch)

    def static(self, fetch: WeightFetch = stored_weight) -> ResNetBasicBlock:
        downsample = nn.Sequential(nn.AvgPool2d(2, 2), self.shortcut.static(self.shortcut.max_in,
                                                                            weight=fetch(self.shortcut)))
        return ResNetBasicBlock(self.conv_a.static(fetch), self.conv_b.static(fetch), downsample)


class ResNetBasicBlock(nn.Module):
    """Static reduction block: residual(x) + conv_b(conv_a(x))."""

    def __init__(self, conv_a: nn.Module, conv_b: nn.Module, downsample: nn.Module):
        super().__init__()
        self.conv_a, self.conv_b, self.downsample = conv_a, conv_b, downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x) + self.conv_b(self.conv_a(x))


class Head(nn.Module):
    """`lastact` (BN -> ReLU) -> global average pool -> linear classifier, as in the benchmark."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(F.relu(self.bn(x))), 1))

    @torch.no_grad()
    def static(self) -> nn.Sequential:
        return nn.Sequential(copy.deepcopy(self.bn), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                             copy.deepcopy(self.classifier))
