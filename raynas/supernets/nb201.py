"""NAS-Bench-201 topology space (seed 000, Kshot-Hypernet) and its weight-sharing supernet.

Cell: `nodes` nodes, one edge j<-i for every i<j (4 nodes -> 6 edges, dims `edge_1_0`, `edge_2_0`,
`edge_2_1`, `edge_3_0`, `edge_3_1`, `edge_3_2`), each edge one of the benchmark's ops; node j sums its
incoming edges and the cell outputs the last node. Macro skeleton = the benchmark's inference
network (TinyNetwork): stem conv3x3+BN, stages of `cells_per_stage` cells with `channels[s]` channels,
a ResNet basic block with stride 2 between stages, BN+ReLU, global average pool, linear classifier.

Every one of the 5**6 = 15,625 cells is its own arch (no canonicalisation): the benchmark indexes all
of them and builds every edge, even those that cannot reach the output, so costs match its tables.

Supernet: single path for `forward(x, arch)`; `forward(x, None)` is the teacher of seed 000 (eq. 5), a
DARTS mixture over all ops of every edge weighted by softmax(`arch_params`), one (edges, ops) matrix
shared by all cells. Ops do not share weights (a topology space; weights differ per edge and op);
all convs are weight slots read through `weight_fetch(arch)`, so `set_weight_generator` can supply
arch-conditioned weights (Kshot-Hypernet) for any of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raynas import config
from raynas.space import Arch, Dim, SearchSpace, SpaceError
from raynas.supernets.base import Block, TopologySupernet, declared_fields
from raynas.supernets.nb201_ops import (
    CONV_KERNELS,
    OP_COST_RANK,
    OP_NAMES,
    Head,
    ResNetReduction,
    SuperCell,
    stem,
)

FAMILY_KEYS = ("channels", "cells_per_stage", "nodes", "ops")


def edge_name(to: int, src: int) -> str:
    return f"edge_{to}_{src}"


@dataclass
class NB201Space(SearchSpace):
    """The cell-topology space. Dims are the edges in the benchmark's order (by target, then source).

    The structure is kept in fields (not read back from `config`, which holds the raw declaration).
    """

    channels: tuple[int, ...] = (16, 32, 64)
    cells_per_stage: int = 5
    num_nodes: int = 4
    ops: tuple[str, ...] = OP_NAMES

    # ---- structure -----------------------------------------------------------------------------
    @property
    def edges(self) -> tuple[tuple[int, int], ...]:
        """(target, source) node pairs, in dim order."""
        return tuple((j, i) for j in range(1, self.num_nodes) for i in range(j))

    @property
    def edge_names(self) -> tuple[str, ...]:
        return tuple(edge_name(j, i) for j, i in self.edges)

    def cell_ops(self, arch: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(arch[name] for name in self.edge_names)

    # ---- extremes ------------------------------------------------------------------------------
    def min_arch(self) -> Arch:
        """Cheapest cell that still passes its input on: the output node reads node 0 through the
        cheapest non-`none` op (skip_connect: the cell is the identity), every other edge `none`.

        An all-`none` cell would be as cheap but zeroes its output, making the network a constant.
        """
        cheapest = min((op for op in self.ops if op != "none"), key=OP_COST_RANK.index)
        out_edge = edge_name(self.num_nodes - 1, 0)
        fill = "none" if "none" in self.ops else cheapest
        return self._make({n: (cheapest if n == out_edge else fill) for n in self.edge_names})

    def max_arch(self) -> Arch:
        """Every edge the most expensive op (nor_conv_3x3 in the benchmark's op set)."""
        dearest = max(self.ops, key=OP_COST_RANK.index)
        return self._make({n: dearest for n in self.edge_names})

    # ---- the benchmark's arch strings ----------------------------------------------------------
    def arch_str(self, arch: Mapping[str, Any]) -> str:
        """NAS-Bench-201 spelling, e.g. `|nor_conv_3x3~0|+|none~0|skip_connect~1|+|...|`."""
        nodes = []
        for j in range(1, self.num_nodes):
            nodes.append("|" + "|".join(f"{arch[edge_name(j, i)]}~{i}" for i in range(j)) + "|")
        return "+".join(nodes)

    def from_arch_str(self, text: str) -> Arch:
        where = f"arch string {text!r}"
        parts = text.strip().split("+")
        if len(parts) != self.num_nodes - 1:
            raise SpaceError(f"{where}: expected {self.num_nodes - 1} nodes separated by '+'")
        values = {}
        for j, part in enumerate(parts, start=1):
            items = [s for s in part.strip().strip("|").split("|") if s]
            if len(items) != j:
                raise SpaceError(f"{where}: node {j} needs {j} 'op~source' entries, got {len(items)}")
            for item in items:
                op, _, src = item.partition("~")
                if not src.isdigit() or int(src) >= j:
                    raise SpaceError(f"{where}: bad entry {item!r} for node {j}")
                values[edge_name(j, int(src))] = op
        return self.validate(values)

    def arch_summary(self, arch: Mapping[str, Any]) -> str:
        """The benchmark's own spelling of the cell (`arch_str`), which its readers know."""
        return self.arch_str(arch)

    # ---- analytic cost -------------------------------------------------------------------------
    def _check_resolution(self, r: int) -> None:
        step = 2 ** (len(self.channels) - 1)
        if r < step or r % step:
            raise SpaceError(f"space {self.name}.resolution: must be a positive multiple of {step} "
                             f"({len(self.channels) - 1} stride-2 reductions), got {r}")

    def cost(self, arch: Mapping[str, Any], resolution: int | None = None) -> dict[str, int]:
        """Params and MACs of the extracted subnet (conv + linear multiply-accumulates, like
        `count_cost`: no bias adds, norms, pooling or elementwise ops)."""
        r = resolution or self.resolution
        self._check_resolution(r)
        cell = self.cell_ops(arch)
        c0 = self.channels[0]
        hw = r * r
        params = 9 * self.in_channels * c0 + 2 * c0
        macs = 9 * self.in_channels * c0 * hw
        c_prev = c0
        for s, c in enumerate(self.channels):
            if s > 0:  # ResNet reduction block; its output is at the halved resolution
                r //= 2
                hw = r * r
                w = 9 * c_prev * c + 9 * c * c + c_prev * c
                params += w + 4 * c
                macs += w * hw
            for op in cell:
                if op in CONV_KERNELS:
                    w = CONV_KERNELS[op] ** 2 * c * c
                    params += self.cells_per_stage * (w + 2 * c)
                    macs += self.cells_per_stage * w * hw
            c_prev = c
        params += 2 * c_prev + c_prev * self.num_classes + self.num_classes
        macs += c_prev * self.num_classes
        return {"params": int(params), "macs": int(macs)}

    def reference_flops(self, arch: Mapping[str, Any], resolution: int | None = None) -> int:
        """FLOPs by the benchmark's own counter (xautodl `get_model_infos`, batch 1; it reports /1e6).

        That counter sums conv (k*k*C_in*C_out/groups per output pixel, + bias) and linear
        (in*out + out) layers; its pooling hooks run but are left out of the total, BN is not counted.
        So it is our MACs (bias-free convs) plus the classifier's bias adds.
        """
        return self.cost(arch, resolution)["macs"] + self.num_classes


def build_space(cfg: dict) -> NB201Space:
    where = f"space {cfg['name']}"
    channels = config.int_choices(config.required(cfg, "channels", where), f"{where}.channels")  # one per stage
    cells = config.integer(config.required(cfg, "cells_per_stage", where), f"{where}.cells_per_stage", minimum=1)
    nodes = config.integer(config.required(cfg, "nodes", where), f"{where}.nodes", minimum=2)
    # the order written is the dims' choice order (the benchmark's beta columns)
    ops = config.names(config.required(cfg, "ops", where), f"{where}.ops", OP_NAMES)
    if ops == ("none",):
        config.fail(f"{where}.ops", "only 'none' would zero every cell", "at least one op besides 'none'")
    dims = tuple(Dim(edge_name(j, i), tuple(ops)) for j in range(1, nodes) for i in range(j))
    space = NB201Space(dims=dims, channels=tuple(channels), cells_per_stage=cells, num_nodes=nodes, ops=tuple(ops),
                       **declared_fields(cfg, resolution=32, num_classes=10))
    space._check_resolution(space.resolution)
    return space


class NB201Supernet(TopologySupernet):
    """All 15,625 NAS-Bench-201 networks in one module (see the module docstring)."""

    space: NB201Space

    def __init__(self, space: NB201Space):
        super().__init__(space)
        channels, edges, ops = space.channels, space.edges, space.ops
        self.stem = stem(space.in_channels, channels[0])
        layers: list[nn.Module] = []
        self._layer_kinds: list[tuple[str, int, int]] = []  # (kind, C_in, C_out)
        c_prev = channels[0]
        for s, c in enumerate(channels):
            if s > 0:
                layers.append(ResNetReduction(c_prev, c))
                self._layer_kinds.append(("reduce", c_prev, c))
            for _ in range(space.cells_per_stage):
                layers.append(SuperCell(c, edges, ops))
                self._layer_kinds.append(("cell", c, c))
            c_prev = c
        self.cells = nn.ModuleList(layers)
        self.head = Head(c_prev, space.num_classes)
        # beta of seed 000 eq. 5: rows follow `space.edge_names`, columns `space.ops`. DARTS-style init.
        self.arch_params = nn.Parameter(1e-3 * torch.randn(len(edges), len(ops)))
        self.name_conv_slots()

    # ---- the topology interface (FocusFair, Kshot-Hypernet) ----------------------------------
    def op_names(self) -> tuple[str, ...]:
        return self.space.ops

    def topology_dims(self) -> tuple[str, ...]:
        return self.space.edge_names

    def edge_names(self) -> tuple[str, ...]:
        return self.space.edge_names

    def active_conv_slots(self, arch: Mapping[str, Any]) -> list[str]:
        """Slot names of the convs the single-path subnet `arch` runs (stem and reductions included)."""
        cell = self.space.cell_ops(self.as_arch(arch))
        cell_convs = [(e, op) for e, op in enumerate(cell) if op in CONV_KERNELS]
        slots = list(self.conv_slots())
        active = {name for name in slots if ".edges." not in name}  # stem and reduction blocks
        for i, (kind, _, _) in enumerate(self._layer_kinds):
            if kind == "cell":
                active.update(f"cells.{i}.edges.{e}.{op}.conv" for e, op in cell_convs)
        return [name for name in slots if name in active]

    # ---- protocol ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, arch: Mapping[str, Any] | None = None) -> torch.Tensor:
        arch = self.as_arch(arch)
        step = 2 ** (len(self.space.channels) - 1)
        if x.shape[-1] % step or x.shape[-2] % step:
            raise ValueError(f"nb201: input {tuple(x.shape)}: height and width must be multiples of {step}")
        fetch = self.weight_fetch(arch)
        x = self.stem(x, weight=fetch(self.stem.conv))
        alphas = self.arch_weights() if arch is None else None
        cell = None if arch is None else self.space.cell_ops(arch)
        for layer in self.cells:
            if not isinstance(layer, SuperCell):
                x = layer(x, fetch)
            elif alphas is not None:
                x = layer.forward_mixture(x, alphas, fetch)
            else:
                x = layer(x, cell, fetch)
        return self.head(x)

    @torch.no_grad()
    def blocks(self, arch: Arch, resolution: int | None = None) -> list[Block]:
        arch = self.space.validate(arch)
        r = resolution or self.space.resolution
        self.space._check_resolution(r)
        fetch = self.weight_fetch(arch)
        cell = self.space.cell_ops(arch)
        cell_str = self.space.arch_str(arch)
        c = self.space.channels[0]
        shape = (1, self.space.in_channels, r, r)
        stem = self.stem.static(shape[1], weight=fetch(self.stem.conv))
        blocks = [Block(f"nb201.stem:{shape[1]}x{r}x{r}->{c}", stem, shape)]
        for layer, (kind, c_in, c_out) in zip(self.cells, self._layer_kinds):
            shape = (1, c_in, r, r)
            if kind == "reduce":
                blocks.append(Block(f"nb201.reduce:{c_in}x{r}x{r}->{c_out}", layer.static(fetch), shape))
                r //= 2
            else:
                key = f"nb201.cell:{c_in}x{r}x{r}:{cell_str}"
                blocks.append(Block(key, layer.static(cell, fetch), shape))
            c = c_out
        shape = (1, c, r, r)
        blocks.append(Block(f"nb201.head:{c}x{r}x{r}->{self.space.num_classes}", self.head.static(), shape))
        return blocks

    def cost(self, arch: Mapping[str, Any], resolution: int | None = None) -> dict[str, int]:
        return self.space.cost(self.as_arch(arch), resolution)

    def reference_flops(self, arch: Mapping[str, Any], resolution: int | None = None) -> int:
        return self.space.reference_flops(self.as_arch(arch), resolution)


def build_supernet(space: NB201Space, **kwargs: Any) -> NB201Supernet:
    if kwargs:
        raise SpaceError(f"nb201 supernet: unknown options {sorted(kwargs)}; it takes none")
    return NB201Supernet(space)


def reference_flops(space: NB201Space, arch: Mapping[str, Any], resolution: int | None = None) -> int:
    """Module-level alias of `NB201Space.reference_flops` (the benchmark's FLOP convention)."""
    return space.reference_flops(space.validate(arch), resolution)


__all__ = ["NB201Space", "NB201Supernet", "build_space", "build_supernet", "edge_name", "reference_flops",
           "OP_NAMES"]
