"""`mbv3` family: the OFA-style MobileNetV3 inverted-residual space of seed 002 §3.2.

Searched: global width multiplier, depth per stage, kernel and expansion per block, input
resolution. The stage table (channels, strides, SE, activation) lives in the YAML.

Resolution semantics. The space's `resolution` is the size of the images fed to a subnet. The
`resolution` dim holds the YAML's `resolution_choices` that are <= that size; a subnet resizes its
input (bilinear, BigNAS-style) to its chosen resolution as its first piece, so every subnet of a
space takes the same input (`input_shape()`) and `cost(arch)` counts the network at the arch's own
resolution. When no choice fits (e.g. `resolution=32` for tests or digits) the dim collapses to the
single value `resolution`, the resolution is not searched and a subnet runs at whatever it is fed.

Couplings for big/little pairs (issue 6) build on the pieces: `forward_stem` (resize, first conv,
fixed first block), `forward_slots` (the searchable blocks whose slot index lies in a range; a slot
is one (stage, block) position of the largest network, see `slots`), `forward_head`; `blocks` and
`cost` take the same `stem/start/end/head` range, and `plan(arch)` gives every resolved size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from raynas import config as c
from raynas.nn.dynamic import make_divisible
from raynas.nn.layers import DynamicInvertedResidual, conv_out_size
from raynas.space import Arch, Dim, SearchSpace, SpaceError
from raynas.space.summary import per_block, short
from raynas.supernets.base import (
    Block,
    ProgressiveShrinking,
    StageFeatures,
    StageSpec,
    Supernet,
    declared_fields,
)
from raynas.supernets.mbv3_blocks import (
    ACTIVATIONS,
    BlockPlan,
    DynamicHead,
    DynamicStem,
    HeadPlan,
    InputResize,
    StemPlan,
    block_cost,
    resize_input,
)

FAMILY_KEYS = ("resolution_choices", "width_choices", "depth_choices", "kernel_choices", "expand_choices",
               "channel_divisor", "se_reduction", "stem", "first_block", "stages", "head")
STEM_KEYS = ("channels", "kernel", "stride", "act")
FIRST_BLOCK_KEYS = ("channels", "kernel", "expand", "act", "se")
STAGE_KEYS = ("channels", "stride", "act", "se", "depth_choices", "kernel_choices", "expand_choices")
HEAD_KEYS = ("expand", "features", "act", "dropout")


# ---- declared structure --------------------------------------------------------------------------
@dataclass(frozen=True)
class MBV3Stage(StageSpec):
    """A stage at its declared width (`widths` holds that one value; the width multiplier scales it)."""

    act: str = "relu"
    se: bool = False

    @property
    def channels(self) -> int:
        return self.widths[0]


@dataclass(frozen=True)
class Widths:
    """Channel counts of every layer group at one width multiplier."""

    stem: int
    first: int
    stages: tuple[int, ...]
    head_expand: int
    features: int


@dataclass(frozen=True)
class MBV3Structure:
    stem_channels: int
    stem_kernel: int
    stem_stride: int
    stem_act: str
    first_channels: int
    first_kernel: int
    first_expand: int
    first_act: str
    first_se: bool
    stages: tuple[MBV3Stage, ...]
    head_expand: int
    head_features: int
    head_act: str
    dropout: float
    widths: tuple[float, ...]
    resolutions: tuple[int, ...]
    divisor: int
    se_reduction: int

    def widths_at(self, width: float) -> Widths:
        def scale(c: int) -> int:
            return make_divisible(c * width, self.divisor)

        # MobileNetV2/V3 and OFA keep the last feature layer at full width for multipliers below 1.
        features = self.head_features if width <= 1.0 else scale(self.head_features)
        return Widths(scale(self.stem_channels), scale(self.first_channels),
                      tuple(scale(s.channels) for s in self.stages), scale(self.head_expand), features)

    def se_mid(self, hidden: int) -> int:
        return make_divisible(hidden // self.se_reduction, self.divisor)

    def stage_residual_first(self, s: int) -> bool:
        """A stage's first block keeps the skip only when stride 1 and (declared) width unchanged."""
        prev = self.first_channels if s == 0 else self.stages[s - 1].channels
        return self.stages[s].stride == 1 and prev == self.stages[s].channels


# ---- YAML validation -----------------------------------------------------------------------------
def parse_structure(cfg: Mapping[str, Any], where: str) -> MBV3Structure:
    """Validate the family keys of a space declaration; errors name `space <name>.<field>`."""
    ws, wf, wh = f"{where}.stem", f"{where}.first_block", f"{where}.head"
    stem, first, head = (c.mapping(c.required(cfg, key, where), w)
                         for key, w in (("stem", ws), ("first_block", wf), ("head", wh)))
    c.check_known(stem, STEM_KEYS, ws)
    c.check_known(first, FIRST_BLOCK_KEYS, wf)
    c.check_known(head, HEAD_KEYS, wh)
    acts = sorted(ACTIVATIONS)
    depths = c.int_choices(c.required(cfg, "depth_choices", where), f"{where}.depth_choices", as_set=True)
    kernels = c.int_choices(c.required(cfg, "kernel_choices", where), f"{where}.kernel_choices", odd=True, as_set=True)
    expands = c.int_choices(c.required(cfg, "expand_choices", where), f"{where}.expand_choices", as_set=True)
    stages = []
    for i, st in enumerate(c.mapping_list(c.required(cfg, "stages", where), f"{where}.stages", STAGE_KEYS)):
        w = f"{where}.stages[{i}]"
        stages.append(MBV3Stage(
            widths=(c.integer(c.required(st, "channels", w), f"{w}.channels", minimum=1),),
            stride=c.integer(c.required(st, "stride", w), f"{w}.stride", 1, 2),
            act=c.choice(c.required(st, "act", w), f"{w}.act", acts),
            se=c.boolean(c.required(st, "se", w), f"{w}.se"),
            # a stage's own choice lists, else the space-wide ones
            depths=(c.int_choices(st["depth_choices"], f"{w}.depth_choices", as_set=True)
                    if "depth_choices" in st else depths),
            kernels=(c.int_choices(st["kernel_choices"], f"{w}.kernel_choices", odd=True, as_set=True)
                     if "kernel_choices" in st else kernels),
            expansions=(c.int_choices(st["expand_choices"], f"{w}.expand_choices", as_set=True)
                        if "expand_choices" in st else expands),
        ))
    return MBV3Structure(
        stem_channels=c.integer(c.required(stem, "channels", ws), f"{ws}.channels", minimum=1),
        stem_kernel=c.integer(c.required(stem, "kernel", ws), f"{ws}.kernel", minimum=1, odd=True),
        stem_stride=c.integer(c.required(stem, "stride", ws), f"{ws}.stride", 1, 2),
        stem_act=c.choice(c.required(stem, "act", ws), f"{ws}.act", acts),
        first_channels=c.integer(c.required(first, "channels", wf), f"{wf}.channels", minimum=1),
        first_kernel=c.integer(c.required(first, "kernel", wf), f"{wf}.kernel", minimum=1, odd=True),
        first_expand=c.integer(c.required(first, "expand", wf), f"{wf}.expand", minimum=1),
        first_act=c.choice(c.required(first, "act", wf), f"{wf}.act", acts),
        first_se=c.boolean(c.required(first, "se", wf), f"{wf}.se"),
        stages=tuple(stages),
        head_expand=c.integer(c.required(head, "expand", wh), f"{wh}.expand", minimum=1),
        head_features=c.integer(c.required(head, "features", wh), f"{wh}.features", minimum=1),
        head_act=c.choice(c.required(head, "act", wh), f"{wh}.act", acts),
        dropout=c.number(head.get("dropout", 0.0), f"{wh}.dropout", 0.0, 1.0, high_open=True),
        widths=tuple(float(m) for m in c.number_choices(c.required(cfg, "width_choices", where),
                                                        f"{where}.width_choices", high=4.0, as_set=True)),
        resolutions=c.int_choices(c.required(cfg, "resolution_choices", where), f"{where}.resolution_choices",
                                  as_set=True),
        divisor=c.integer(c.required(cfg, "channel_divisor", where), f"{where}.channel_divisor", minimum=1),
        se_reduction=c.integer(c.required(cfg, "se_reduction", where), f"{where}.se_reduction", minimum=1),
    )


# ---- the space -----------------------------------------------------------------------------------
def stage_dim(s: int, field_name: str, j: int | None = None) -> str:
    """Dim names: `stage1.depth`, `stage1.b0.kernel`, `stage1.b0.expand` (stages counted from 1)."""
    return f"stage{s + 1}.{field_name}" if j is None else f"stage{s + 1}.b{j}.{field_name}"


@dataclass
class MBV3Space(SearchSpace, ProgressiveShrinking):
    structure: MBV3Structure | None = None
    _width_rep: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        super().__post_init__()
        # Two multipliers that round to the same channels everywhere are one network: keep the smallest.
        seen: dict[Widths, float] = {}
        for w in self.dim("width").choices:
            self._width_rep[w] = seen.setdefault(self.structure.widths_at(w), w)

    @property
    def resolution_searched(self) -> bool:
        return self.dim("resolution").size > 1

    def canonicalize(self, values: dict[str, Any]) -> dict[str, Any]:
        values = dict(values)
        values["width"] = self._width_rep[values["width"]]
        for s, st in enumerate(self.structure.stages):
            depth = values[stage_dim(s, "depth")]
            for j in range(depth, max(st.depths)):
                values[stage_dim(s, "kernel", j)] = st.kernels[0]
                values[stage_dim(s, "expand", j)] = st.expansions[0]
        return values

    def arch_summary(self, arch: Mapping[str, Any]) -> str:
        """`r224 w1|d2 k3 e4|d4 k3 e6222|...`: resolution and width multiplier, then per stage its depth and
        its blocks' kernels and expansions (one value when the blocks agree)."""
        stages = []
        for s in range(len(self.structure.stages)):
            blocks = range(arch[stage_dim(s, "depth")])
            stages.append(f"d{len(blocks)} k{per_block(arch[stage_dim(s, 'kernel', j)] for j in blocks)} "
                          f"e{per_block(arch[stage_dim(s, 'expand', j)] for j in blocks)}")
        return "|".join([f"r{arch['resolution']} w{short(arch['width'])}", *stages])

    def progressive_groups(self) -> dict[str, tuple[str, ...]]:
        """OFA's order: elastic kernel, then depth, then width. OFA's "width" of a MobileNetV3 is the
        expansion ratio; the global width multiplier scales channels too, so it is released with it.
        Resolution belongs to no group: OFA samples it in every phase."""
        stages = list(enumerate(self.structure.stages))
        blocks = [(s, j) for s, st in stages for j in range(max(st.depths))]
        return {"kernel": tuple(stage_dim(s, "kernel", j) for s, j in blocks),
                "depth": tuple(stage_dim(s, "depth") for s, _ in stages),
                "width": ("width", *(stage_dim(s, "expand", j) for s, j in blocks))}

    def cardinality(self) -> int:
        """Exact number of distinct networks (after canonicalisation)."""
        total = len(set(self._width_rep.values())) * self.dim("resolution").size
        for st in self.structure.stages:
            per_block = len(st.kernels) * len(st.expansions)
            total *= sum(per_block**d for d in st.depths)
        return total

    def log10_cardinality(self) -> float:
        return math.log10(self.cardinality())


def build_space(cfg: dict) -> MBV3Space:
    where = f"space {cfg['name']}"
    structure = parse_structure(cfg, where)
    resolution = cfg.get("resolution", max(structure.resolutions))
    searched = tuple(r for r in structure.resolutions if r <= resolution)
    dims = [Dim("resolution", searched or (resolution,)), Dim("width", structure.widths)]
    for s, st in enumerate(structure.stages):
        dims.append(Dim(stage_dim(s, "depth"), st.depths))
        for j in range(max(st.depths)):
            dims.append(Dim(stage_dim(s, "kernel", j), st.kernels))
            dims.append(Dim(stage_dim(s, "expand", j), st.expansions))
    return MBV3Space(dims=tuple(dims), structure=structure, **declared_fields(cfg, resolution=resolution))


# ---- the supernet --------------------------------------------------------------------------------
@dataclass(frozen=True)
class SubnetPlan:
    """Every resolved size of one subnet at one input resolution."""

    input_res: int
    run_res: int
    stem: StemPlan
    slots: tuple[int, ...]          # slot index of each active block
    blocks: tuple[BlockPlan, ...]
    head: HeadPlan


class MBV3Supernet(Supernet, StageFeatures):
    """Weight-entangled OFA-style MobileNetV3 supernet: stem, `stages[s][j]` blocks, head."""

    def __init__(self, space: MBV3Space, dropout: float | None = None):
        super().__init__(space)
        self.structure = st = space.structure
        # Every layer is allocated at its widest over all width choices; narrower ones slice it.
        ws = [st.widths_at(w) for w in space.dim("width").choices]
        stem_ch, first_ch = [w.stem for w in ws], [w.first for w in ws]
        first = _elastic_block(st, stem_ch, first_ch, (st.first_expand,), (st.first_kernel,), 1, st.first_se,
                               st.first_act)
        self.stem = DynamicStem(space.in_channels, max(stem_ch), st.stem_kernel, st.stem_stride, st.stem_act,
                                first)
        stages, slots, in_ch = [], [], first_ch
        for s, spec in enumerate(st.stages):
            out_ch = [w.stages[s] for w in ws]
            stages.append(nn.ModuleList(
                _elastic_block(st, in_ch if j == 0 else out_ch, out_ch, spec.expansions, spec.kernels,
                               spec.stride if j == 0 else 1, spec.se, spec.act)
                for j in range(max(spec.depths))))
            slots += [(s, j) for j in range(max(spec.depths))]
            in_ch = out_ch
        self.stages = nn.ModuleList(stages)
        self.slots: tuple[tuple[int, int], ...] = tuple(slots)
        self.head = DynamicHead(max(in_ch), max(w.head_expand for w in ws), max(w.features for w in ws),
                                space.num_classes, st.head_act, st.dropout if dropout is None else dropout)

    # ---- resolved sizes ------------------------------------------------------------------------
    def arch_resolution(self, arch: Mapping[str, Any], resolution: int | None = None) -> int:
        """The resolution a subnet runs at: the arch's when searched, else the input's."""
        if self.space.resolution_searched:
            return int(arch["resolution"])
        return resolution or self.space.resolution

    def plan(self, arch: Mapping[str, Any], resolution: int | None = None) -> SubnetPlan:
        """Every layer size of `arch` fed `resolution`-sized inputs (default: the space's)."""
        st, arch = self.structure, self._arch(arch)
        input_res = resolution or self.space.resolution
        run_res = self.arch_resolution(arch, resolution)
        ch = st.widths_at(arch["width"])
        hw = conv_out_size(run_res, st.stem_kernel, st.stem_stride)
        first_hidden = ch.stem * st.first_expand
        first = BlockPlan(ch.stem, ch.first, st.first_expand, st.first_kernel, 1,
                          st.se_mid(first_hidden) if st.first_se else 0, st.first_act,
                          st.stem_channels == st.first_channels, hw, has_expand=st.first_expand > 1)
        stem = StemPlan(self.space.in_channels, ch.stem, st.stem_kernel, st.stem_stride, st.stem_act,
                        run_res, first)
        slots, blocks, in_ch, slot = [], [], ch.first, 0
        for s, spec in enumerate(st.stages):
            depth = arch[stage_dim(s, "depth")]
            for j in range(max(spec.depths)):
                if j < depth:
                    expand, out_ch = arch[stage_dim(s, "expand", j)], ch.stages[s]
                    stride = spec.stride if j == 0 else 1
                    p = BlockPlan(in_ch, out_ch, expand, arch[stage_dim(s, "kernel", j)], stride,
                                  st.se_mid(in_ch * expand) if spec.se else 0, spec.act,
                                  j > 0 or st.stage_residual_first(s), hw, has_expand=max(spec.expansions) > 1)
                    slots.append(slot)
                    blocks.append(p)
                    in_ch, hw = out_ch, p.out_hw
                slot += 1
        head = HeadPlan(in_ch, ch.head_expand, ch.features, self.space.num_classes, st.head_act, hw)
        return SubnetPlan(input_res, run_res, stem, tuple(slots), tuple(blocks), head)

    def _arch(self, arch: Mapping[str, Any] | None) -> Arch:
        return self.space.max_arch() if arch is None else self.as_arch(arch)

    def _range(self, plan: SubnetPlan, start: int, end: int | None) -> list[tuple[int, BlockPlan]]:
        end = len(self.slots) if end is None else end
        return [(i, p) for i, p in zip(plan.slots, plan.blocks) if start <= i < end]

    # ---- forward pieces ------------------------------------------------------------------------
    def forward_stem(self, x: torch.Tensor, arch: Mapping[str, Any] | None = None) -> torch.Tensor:
        """Resize to the arch's resolution (when searched), first conv, fixed first block."""
        plan = self.plan(self._arch(arch))
        if self.space.resolution_searched and tuple(x.shape[-2:]) != (plan.run_res, plan.run_res):
            x = resize_input(x, plan.run_res)
        return self.stem(x, plan.stem)

    def forward_slots(self, h: torch.Tensor, arch: Mapping[str, Any] | None = None, start: int = 0,
                      end: int | None = None) -> torch.Tensor:
        """The arch's active blocks whose slot index is in [start, end) (`self.slots` order)."""
        return self.forward_slot_features(h, arch, start, end)[0]

    def stage_ends(self) -> tuple[int, ...]:
        """The slot index one past each stage's last slot: where a stage's output is taken."""
        slots = self.slots
        return tuple(i + 1 for i, (s, _) in enumerate(slots) if i + 1 == len(slots) or slots[i + 1][0] != s)

    def forward_slot_features(self, h: torch.Tensor, arch: Mapping[str, Any] | None = None, start: int = 0,
                              end: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`forward_slots`, and the output of every stage that ends in (start, end]: the tensor at that
        stage boundary (whatever the arch's depth, so two archs give features at the same places)."""
        plan = self.plan(self._arch(arch))
        end = len(self.slots) if end is None else end
        bounds = [b for b in self.stage_ends() if start < b <= end]
        features: list[torch.Tensor] = []
        for i, p in self._range(plan, start, end):
            while len(features) < len(bounds) and i >= bounds[len(features)]:
                features.append(h)
            s, j = self.slots[i]
            h = self.stages[s][j](h, **p.choice())
        features += [h] * (len(bounds) - len(features))
        return h, features

    def forward_head(self, h: torch.Tensor, arch: Mapping[str, Any] | None = None) -> torch.Tensor:
        return self.head(h, self.plan(self._arch(arch)).head)

    def forward(self, x: torch.Tensor, arch: Mapping[str, Any] | None = None, *,
                features: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        if features:
            return self.forward_features(x, arch)
        arch = self._arch(arch)  # None: the largest subnet is the teacher
        return self.forward_head(self.forward_slots(self.forward_stem(x, arch), arch), arch)

    def forward_features(self, x: torch.Tensor, arch: Mapping[str, Any] | None = None
                         ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits, output of each stage): what feature distillation compares."""
        arch = self._arch(arch)
        h, features = self.forward_slot_features(self.forward_stem(x, arch), arch)
        return self.forward_head(h, arch), features

    # ---- extraction and cost -------------------------------------------------------------------
    def blocks(self, arch: Mapping[str, Any], resolution: int | None = None, *, stem: bool = True,
               start: int = 0, end: int | None = None, head: bool = True) -> list[Block]:
        """Static pieces with inherited weights: [resize], stem, blocks of slots [start, end), head."""
        plan = self.plan(arch, resolution)
        c = self.space.in_channels
        pieces: list[Block] = []
        if stem:
            if plan.input_res != plan.run_res:
                pieces.append(Block(f"mbv3.resize:{c}x{plan.input_res}->{plan.run_res}",
                                    InputResize(plan.run_res), (1, c, plan.input_res, plan.input_res)))
            pieces.append(Block(plan.stem.key, self.stem.static(plan.stem), (1, c, plan.run_res, plan.run_res)))
        for i, p in self._range(plan, start, end):
            s, j = self.slots[i]
            pieces.append(Block(p.key, self.stages[s][j].static(p.in_ch, **p.choice()), (1, p.in_ch, p.in_hw, p.in_hw)))
        if head:
            h = plan.head
            pieces.append(Block(h.key, self.head.static(h), (1, h.in_ch, h.in_hw, h.in_hw)))
        for piece in pieces:
            piece.module.train(self.training)
        return pieces

    def cost(self, arch: Mapping[str, Any], resolution: int | None = None, *, stem: bool = True,
             start: int = 0, end: int | None = None, head: bool = True) -> dict[str, int]:
        """Exact params and MACs of `blocks(...)` of the same arguments, without building them."""
        plan = self.plan(arch, resolution)
        parts = [block_cost(self.stages[s][j], p)
                 for (s, j), p in ((self.slots[i], p) for i, p in self._range(plan, start, end))]
        if stem:
            parts.append(self.stem.cost(plan.stem))
        if head:
            parts.append(self.head.cost(plan.head))
        return {"params": sum(p for p, _ in parts), "macs": sum(m for _, m in parts)}


def _elastic_block(st: MBV3Structure, in_ch: list[int], out_ch: list[int], expands: tuple[int, ...],
                   kernels: tuple[int, ...], stride: int, se: bool, act: str) -> DynamicInvertedResidual:
    hidden = [c * e for c in in_ch for e in expands]
    return DynamicInvertedResidual(max(in_ch), max(out_ch), max(hidden), max(kernels), stride, act,
                                   max(st.se_mid(h) for h in hidden) if se else 0, has_expand=max(expands) > 1)


def build_supernet(space: SearchSpace, **kwargs: Any) -> MBV3Supernet:
    if not isinstance(space, MBV3Space):
        raise SpaceError(f"space {space.name}: family 'mbv3' needs a space built by raynas.supernets.mbv3")
    unknown = sorted(set(kwargs) - {"dropout"})
    if unknown:
        raise SpaceError(f"supernet option '{unknown[0]}': unknown for family mbv3; allowed: ['dropout']")
    return MBV3Supernet(space, **kwargs)
