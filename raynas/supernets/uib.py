"""`uib` family: the MobileNetV4-UIB size + topology space of seed 000 (Kshot-Hypernet, Table 9).

Structure (declared in YAML, see spaces/khyper-uib.yaml):
    stem conv kxk/s -> stages of UIB blocks -> MobileNetV3 head (1x1 conv, pool, linear, classifier).
Searched per stage: output channels and depth; per block: the UIB variant (`op`: ffn, convnext, ib,
extra_dw), the kernels K1 (dw_start) and K2 (dw_mid) it uses, and the expansion ratio when a stage
declares more than one.

Arch fields: `stage{s}.channels`, `stage{s}.depth`, `stage{s}.b{i}.op`, `stage{s}.b{i}.k1`,
`stage{s}.b{i}.k2` (+ `stage{s}.b{i}.expand` if searched). Stages count from 1 like the paper.

The supernet holds separate weights per op at every block position (ops are distinct candidates
of a topology space), each weight-entangled across channels, kernels and expansion. `forward(x, None)`
is the seed's teacher: every block position mixes all ops with softmax(`arch_params`) (DARTS eq. 5)
at the largest size choices. Every conv weight is read through `weight_fetch(arch)`, so a
hypernetwork (Kshot-Hypernet) set with `set_weight_generator` can supply any of them; the contract is
the one of the `nb201` supernet (generator(arch) -> {conv slot name: full-size weight}).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raynas import config as c
from raynas.nn.dynamic import make_divisible
from raynas.nn.layers import DynamicConvNormAct, act_fn, act_layer
from raynas.space import Arch, Dim, SearchSpace, SpaceError
from raynas.space.summary import short
from raynas.supernets.base import Block, StageSpec, TopologySupernet, WeightGenerator, declared_fields
from raynas.supernets.uib_blocks import (
    ACTIVATIONS,
    OP_NAMES,
    ElasticUIB,
    op_has_mid_dw,
    op_has_start_dw,
    unit_cost,
)

FAMILY_KEYS = ("stem", "ops", "stages", "head", "activation", "named_archs")
STAGE_KEYS = ("channels", "depth", "kernels", "expand", "stride")
HEAD_KEYS = ("channels", "hidden", "dropout", "activation")


# One letter per op in arch summaries.
OP_LETTERS = {"extra_dw": "X", "ib": "I", "convnext": "C", "ffn": "F"}


# ---- declaration -------------------------------------------------------------------------------
@dataclass(frozen=True)
class UIBSpec:
    stem_channels: int
    stem_kernel: int
    stem_stride: int
    ops: tuple[str, ...]
    stages: tuple[StageSpec, ...]
    head_channels: int
    head_hidden: int
    head_dropout: float
    head_activation: str
    activation: str


def _parse_stage(cfg: Mapping[str, Any], where: str) -> StageSpec:
    return StageSpec(
        widths=c.int_choices(c.required(cfg, "channels", where), f"{where}.channels", as_set=True),
        depths=c.int_choices(c.required(cfg, "depth", where), f"{where}.depth", as_set=True),
        kernels=c.int_choices(c.required(cfg, "kernels", where), f"{where}.kernels", odd=True, as_set=True),
        expansions=c.number_choices(c.required(cfg, "expand", where), f"{where}.expand", as_set=True),
        stride=c.integer(c.required(cfg, "stride", where), f"{where}.stride", minimum=1),
    )


def parse_spec(cfg: Mapping[str, Any], where: str) -> UIBSpec:
    ws, wh = f"{where}.stem", f"{where}.head"
    stem = c.mapping(c.required(cfg, "stem", where), ws)
    c.check_known(stem, ("channels", "kernel", "stride"), ws)
    stages_cfg = c.mapping_list(c.required(cfg, "stages", where), f"{where}.stages", STAGE_KEYS)
    head = c.mapping(c.required(cfg, "head", where), wh)
    c.check_known(head, HEAD_KEYS, wh)
    return UIBSpec(
        stem_channels=c.integer(c.required(stem, "channels", ws), f"{ws}.channels", minimum=1),
        stem_kernel=c.integer(c.required(stem, "kernel", ws), f"{ws}.kernel", minimum=1, odd=True),
        stem_stride=c.integer(c.required(stem, "stride", ws), f"{ws}.stride", minimum=1),
        ops=c.names(c.required(cfg, "ops", where), f"{where}.ops", OP_NAMES, sort=True),  # size order
        stages=tuple(_parse_stage(s, f"{where}.stages[{i}]") for i, s in enumerate(stages_cfg)),
        head_channels=c.integer(c.required(head, "channels", wh), f"{wh}.channels", minimum=1),
        head_hidden=c.integer(c.required(head, "hidden", wh), f"{wh}.hidden", minimum=1),
        head_dropout=c.number(c.required(head, "dropout", wh), f"{wh}.dropout", 0.0, 1.0, high_open=True),
        head_activation=c.choice(c.required(head, "activation", wh), f"{wh}.activation", ACTIVATIONS),
        activation=c.choice(c.required(cfg, "activation", where), f"{where}.activation", ACTIVATIONS),
    )


# ---- the search space --------------------------------------------------------------------------
def stage_field(s: int, field: str) -> str:
    return f"stage{s + 1}.{field}"


def block_field(s: int, i: int, field: str) -> str:
    return f"stage{s + 1}.b{i}.{field}"


@dataclass(frozen=True)
class NamedArch:
    """A published architecture expressed in this space (e.g. KHyper-S/M/L of seed 000)."""

    name: str
    arch: Arch
    resolution: int
    paper: dict


class UIBSpace(SearchSpace):
    """The UIB space: structural spec + flat dims; canonicalises unused and inactive block fields."""

    def __init__(self, spec: UIBSpec, **fields: Any):
        self.spec = spec
        super().__init__(dims=self._build_dims(spec), **fields)
        self.named_archs: dict[str, NamedArch] = {}

    @staticmethod
    def _build_dims(spec: UIBSpec) -> tuple[Dim, ...]:
        dims = []
        for s, st in enumerate(spec.stages):
            dims += [Dim(stage_field(s, "channels"), st.widths), Dim(stage_field(s, "depth"), st.depths)]
            for i in range(st.max_depth):
                dims += [Dim(block_field(s, i, "op"), spec.ops), Dim(block_field(s, i, "k1"), st.kernels),
                         Dim(block_field(s, i, "k2"), st.kernels)]
                if len(st.expansions) > 1:  # a fixed expansion is no decision: keep archs and encodings short
                    dims.append(Dim(block_field(s, i, "expand"), st.expansions))
        return tuple(dims)

    # The op dims, one per block position in execution order: rows of the supernet's `arch_params`.
    @property
    def topology_dims(self) -> tuple[str, ...]:
        return tuple(block_field(s, i, "op") for s, st in enumerate(self.spec.stages) for i in range(st.max_depth))

    @property
    def op_names(self) -> tuple[str, ...]:
        return self.spec.ops

    def canonicalize(self, values: dict[str, Any]) -> dict[str, Any]:
        """Blocks beyond the depth and kernels an op does not use are reset to their first choice."""
        for s, st in enumerate(self.spec.stages):
            depth = values[stage_field(s, "depth")]
            for i in range(st.max_depth):
                op_f, k1_f, k2_f = (block_field(s, i, f) for f in ("op", "k1", "k2"))
                if i >= depth:
                    values[op_f] = self.spec.ops[0]
                    if len(st.expansions) > 1:
                        values[block_field(s, i, "expand")] = st.expansions[0]
                op = values[op_f]
                if i >= depth or not op_has_start_dw(op):
                    values[k1_f] = st.kernels[0]
                if i >= depth or not op_has_mid_dw(op):
                    values[k2_f] = st.kernels[0]
        return values

    def arch_summary(self, arch: Mapping[str, Any]) -> str:
        """`16x2 I3 F|24x2 X33 X53|...`: per stage channels x depth, then each block's op (X extra_dw,
        I ib, C convnext, F ffn) followed by the kernels it uses (k1, k2) and, where searched, `e` expansion."""
        parts = []
        for s, st in enumerate(self.spec.stages):
            blocks = [OP_LETTERS[b["op"]] + (str(b["k1"]) if op_has_start_dw(b["op"]) else "")
                      + (str(b["k2"]) if op_has_mid_dw(b["op"]) else "")
                      + (f"e{short(b['expand'])}" if len(st.expansions) > 1 else "")
                      for b in self.stage_blocks(arch, s)]
            parts.append(" ".join([f"{arch[stage_field(s, 'channels')]}x{len(blocks)}", *blocks]))
        return "|".join(parts)

    def block_configurations(self, s: int) -> int:
        """Distinct configurations of one active block of stage `s` (op x its kernels x expansion)."""
        k = len(self.spec.stages[s].kernels)
        per_op = {"ffn": 1, "convnext": k, "ib": k, "extra_dw": k * k}
        return sum(per_op[o] for o in self.spec.ops) * len(self.spec.stages[s].expansions)

    def log10_cardinality(self) -> float:
        total = 1
        for s, st in enumerate(self.spec.stages):
            v = self.block_configurations(s)
            total *= len(st.widths) * sum(v**d for d in st.depths)
        return math.log10(total)

    def stage_blocks(self, arch: Arch, s: int) -> list[dict[str, Any]]:
        """The active blocks of stage `s`: op, k1, k2, expand."""
        st = self.spec.stages[s]
        return [
            {"op": arch[block_field(s, i, "op")], "k1": arch[block_field(s, i, "k1")],
             "k2": arch[block_field(s, i, "k2")],
             "expand": arch[block_field(s, i, "expand")] if len(st.expansions) > 1 else st.expansions[0]}
            for i in range(arch[stage_field(s, "depth")])
        ]

    def named_arch(self, name: str) -> Arch:
        if name not in self.named_archs:
            raise SpaceError(f"named arch: unknown '{name}' in space '{self.name}'; "
                             f"allowed: {sorted(self.named_archs)}")
        return self.named_archs[name].arch

    def arch_from_stages(self, stages: Any, where: str) -> Arch:
        """An arch from a readable per-stage list: [{channels: C, blocks: [{op, k1?, k2?, expand?}]}]."""
        if not isinstance(stages, list) or len(stages) != len(self.spec.stages):
            c.fail(f"{where}.stages", f"got {stages!r}", f"a list of {len(self.spec.stages)} stages")
        values: dict[str, Any] = {}
        for s, (st, cfg) in enumerate(zip(self.spec.stages, stages)):
            w = f"{where}.stages[{s}]"
            cfg = c.mapping(cfg, w)
            c.check_known(cfg, ("channels", "blocks"), w)
            values[stage_field(s, "channels")] = c.required(cfg, "channels", w)  # the arch check says which
            blocks = c.required(cfg, "blocks", w)
            if not isinstance(blocks, list):
                c.fail(f"{w}.blocks", f"got {blocks!r}", "a list of blocks {op, k1?, k2?, expand?}")
            values[stage_field(s, "depth")] = len(blocks)
            for i in range(st.max_depth):
                b = blocks[i] if i < len(blocks) else {"op": self.spec.ops[0]}
                bw = f"{w}.blocks[{i}]"
                b = c.mapping(b, bw)
                c.check_known(b, ("op", "k1", "k2", "expand"), bw)
                op = c.string(c.required(b, "op", bw), f"{bw}.op")
                for key, used in (("k1", op_has_start_dw(op)), ("k2", op_has_mid_dw(op))):
                    if key in b and not used:
                        c.fail(f"{bw}.{key}", f"op '{op}' has no such depthwise conv")
                values[block_field(s, i, "op")] = op
                values[block_field(s, i, "k1")] = b.get("k1", st.kernels[0])
                values[block_field(s, i, "k2")] = b.get("k2", st.kernels[0])
                if len(st.expansions) > 1:
                    values[block_field(s, i, "expand")] = b.get("expand", st.expansions[0])
                elif b.get("expand", st.expansions[0]) != st.expansions[0]:
                    c.fail(f"{bw}.expand", f"got {b['expand']!r}",
                           f"{st.expansions[0]} (stage {s + 1}'s fixed expansion)")
        try:
            return self.validate(values)
        except SpaceError as exc:
            raise SpaceError(f"{where}: {exc}") from None


def _parse_named_archs(space: UIBSpace, cfg: Any, where: str) -> dict[str, NamedArch]:
    if cfg is None:
        return {}
    out = {}
    for name, item in c.mapping(cfg, where).items():
        w = f"{where}.{name}"
        item = c.with_defaults(item, {"resolution": space.resolution, "paper": {}, "stages": None}, w)
        out[str(name)] = NamedArch(str(name), space.arch_from_stages(item["stages"], w),
                                   c.integer(item["resolution"], f"{w}.resolution", minimum=1),
                                   c.mapping(item["paper"], f"{w}.paper"))  # published figures
    return out


def build_space(cfg: dict) -> UIBSpace:
    where = f"space {cfg['name']}"
    spec = parse_spec(cfg, where)
    space = UIBSpace(spec, **declared_fields(cfg))
    space.named_archs = _parse_named_archs(space, cfg.get("named_archs"), f"{where}.named_archs")
    return space


# ---- the supernet ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockChoice:
    """One active block of a subnet: where it sits and what it computes (input width known at run time)."""

    stage: int
    index: int
    op: str
    out_ch: int
    k1: int
    k2: int
    expand: float


class UIBSupernet(TopologySupernet):
    """Weight-entangled UIB supernet with a softmax(beta) op-mixture teacher and a weight-generator hook."""

    def __init__(self, space: UIBSpace, weight_generator: WeightGenerator | None = None):
        super().__init__(space)
        self.spec = spec = space.spec
        self.stem = DynamicConvNormAct(space.in_channels, spec.stem_channels, spec.stem_kernel, spec.stem_stride,
                                       act=spec.activation)
        self.stages = nn.ModuleList()
        in_choices: tuple[int, ...] = (spec.stem_channels,)
        for st in spec.stages:
            positions = nn.ModuleList()
            for i in range(st.max_depth):
                ins = in_choices if i == 0 else st.widths
                max_mid = max(make_divisible(c * e) for c in ins for e in st.expansions)
                stride = st.stride if i == 0 else 1
                positions.append(nn.ModuleDict({
                    op: ElasticUIB(op, max(ins), max(st.widths), max_mid, max(st.kernels), stride,
                                   spec.activation)
                    for op in spec.ops
                }))
            self.stages.append(positions)
            in_choices = st.widths
        self.head_conv = DynamicConvNormAct(max(in_choices), spec.head_channels, 1, act=spec.head_activation)
        self.head_fc = nn.Linear(spec.head_channels, spec.head_hidden)
        self.classifier = nn.Linear(spec.head_hidden, space.num_classes)
        # DARTS-style architecture parameters beta: one row per block position, one column per op.
        self.arch_params = nn.Parameter(torch.zeros(len(space.topology_dims), len(spec.ops)))
        self.name_conv_slots()
        if weight_generator is not None:
            self.set_weight_generator(weight_generator)

    # ---- the topology interface (FocusFair, Kshot-Hypernet) --------------------------------------
    def op_names(self) -> tuple[str, ...]:
        return self.spec.ops  # in size order

    def topology_dims(self) -> tuple[str, ...]:
        return self.space.topology_dims

    def active_conv_slots(self, arch: Mapping[str, Any]) -> list[str]:
        """Slot names of the convs the single-path subnet `arch` runs (stem and head included)."""
        prefixes = tuple(f"stages.{b.stage}.{b.index}.{b.op}." for b in self.active_blocks(self.as_arch(arch)))
        return [n for n in self._convs if not n.startswith("stages.") or n.startswith(prefixes)]

    # ---- arch -> active blocks -------------------------------------------------------------------
    def active_blocks(self, arch: Arch) -> list[BlockChoice]:
        out = []
        for s in range(len(self.spec.stages)):
            channels = arch[stage_field(s, "channels")]
            for i, b in enumerate(self.space.stage_blocks(arch, s)):
                out.append(BlockChoice(s, i, b["op"], channels, b["k1"], b["k2"], b["expand"]))
        return out

    def _block(self, b: BlockChoice) -> ElasticUIB:
        return self.stages[b.stage][b.index][b.op]

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, arch: Mapping[str, Any] | None = None) -> torch.Tensor:
        arch = self.as_arch(arch)
        fetch = self.weight_fetch(arch)
        x = self.stem(x, self.spec.stem_channels, self.spec.stem_kernel, weight=fetch(self.stem.conv))
        if arch is None:
            x = self._mixture(x, fetch)
        else:
            for b in self.active_blocks(arch):
                mid = make_divisible(x.shape[1] * b.expand)
                x = self._block(b)(x, b.out_ch, mid, b.k1, b.k2, fetch)
        return self._head(x, fetch)

    def _mixture(self, x: torch.Tensor, fetch) -> torch.Tensor:
        """Teacher: every position of the deepest, widest net mixes all ops by softmax(beta) (largest kernels)."""
        weights = self.arch_weights()
        row = 0
        for st, positions in zip(self.spec.stages, self.stages):
            out_ch, k = max(st.widths), max(st.kernels)
            for ops in positions:
                mid = make_divisible(x.shape[1] * max(st.expansions))
                outs = [ops[op](x, out_ch, mid, k, k, fetch) for op in self.spec.ops]
                x = sum(weights[row, j] * y for j, y in enumerate(outs))
                row += 1
        return x

    def _head(self, x: torch.Tensor, fetch) -> torch.Tensor:
        x = self.head_conv(x, self.spec.head_channels, 1, weight=fetch(self.head_conv.conv))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        x = act_fn(self.spec.head_activation)(self.head_fc(x))
        x = F.dropout(x, self.spec.head_dropout, self.training)
        return self.classifier(x)

    # ---- static subnet ---------------------------------------------------------------------------
    @torch.no_grad()
    def blocks(self, arch: Mapping[str, Any], resolution: int | None = None) -> list[Block]:
        arch = self.space.validate(arch)
        fetch = self.weight_fetch(arch)
        _, c, h, w = self.input_shape(1, resolution)
        spec = self.spec
        pieces = [Block(
            f"uib.stem:{spec.activation}:k{spec.stem_kernel}s{spec.stem_stride}:{c}x{h}x{w}->{spec.stem_channels}",
            self.stem.static(c, spec.stem_channels, spec.stem_kernel, weight=fetch(self.stem.conv)), (1, c, h, w))]
        _, _, h, w = unit_cost(self.stem, c, spec.stem_channels, spec.stem_kernel, h, w)
        c = spec.stem_channels
        for b in self.active_blocks(arch):
            block, mid = self._block(b), make_divisible(c * b.expand)
            # The key says everything that fixes the computation (not the position): equal keys, equal latency.
            key = (f"uib.{b.op}:{spec.activation}:k{b.k1 if op_has_start_dw(b.op) else 0}/"
                   f"{b.k2 if op_has_mid_dw(b.op) else 0}:s{block.stride}:mid{mid}:{c}x{h}x{w}->{b.out_ch}")
            pieces.append(Block(key, block.static(c, b.out_ch, mid, b.k1, b.k2, fetch), (1, c, h, w)))
            _, _, h, w = block.cost(c, b.out_ch, mid, b.k1, b.k2, h, w)
            c = b.out_ch
        # MobileNetV3's head: 1x1 conv + BN + act -> global pool -> linear + act -> dropout -> classifier
        head = nn.Sequential(
            self.head_conv.static(c, spec.head_channels, 1, weight=fetch(self.head_conv.conv)),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1), copy.deepcopy(self.head_fc), act_layer(spec.head_activation),
            nn.Dropout(spec.head_dropout), copy.deepcopy(self.classifier))
        key = (f"uib.head:{spec.head_activation}:{c}x{h}x{w}->{spec.head_channels}->{spec.head_hidden}"
               f"->{self.space.num_classes}")
        pieces.append(Block(key, head, (1, c, h, w)))
        return pieces

    def cost(self, arch: Mapping[str, Any], resolution: int | None = None) -> dict[str, int]:
        """Exact params and MACs of `extract(arch)` at `resolution` (default: the space's), no forward pass."""
        arch = self.as_arch(arch)
        spec = self.spec
        _, c, h, w = self.input_shape(1, resolution)
        params, macs, h, w = unit_cost(self.stem, c, spec.stem_channels, spec.stem_kernel, h, w)
        c = spec.stem_channels
        for b in self.active_blocks(arch):
            mid = make_divisible(c * b.expand)
            p, m, h, w = self._block(b).cost(c, b.out_ch, mid, b.k1, b.k2, h, w)
            params, macs, c = params + p, macs + m, b.out_ch
        p, m, _, _ = unit_cost(self.head_conv, c, spec.head_channels, 1, h, w)
        fc = spec.head_channels * spec.head_hidden + spec.head_hidden * self.space.num_classes
        params += p + fc + spec.head_hidden + self.space.num_classes
        macs += m + fc
        return {"params": int(params), "macs": int(macs)}


def build_supernet(space: UIBSpace, **kwargs: Any) -> UIBSupernet:
    if not isinstance(space, UIBSpace):
        raise SpaceError(f"space '{space.name}': family '{space.family}' is not 'uib'")
    return UIBSupernet(space, **kwargs)
