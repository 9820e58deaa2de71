"""SCAN-Edge supernet (seed 004, Table 5): an EfficientFormerV2 hybrid with searched FFN type, MHSA and activation.

Structure (all of it from the YAML's stage table, `spaces/scanedge.yaml`): a stride-4 stem, then stages
separated by stride-2 embeddings. Every stage has an elastic width and depth; each block is a dual FFN
(unified = 1x1 / depthwise KxK / 1x1, or fused = KxK / 1x1; separate weights per type) with its own
kernel, expansion and activation. Stages that declare `mhsa` may put a multi-head self-attention
block in front of any FFN (its V expansion and activation are searched, `0` = no MHSA), which
searches both the number and the position of MHSA layers. An `mhsa_ds` embedding adds the
downsampling attention of EfficientFormerV2 to the strided conv.

Dimension names: `stem.act`; per stage `stageN.width`, `stageN.depth`, `stageN.bJ.{ffn,expansion,
kernel,act}` and, with MHSA, `stageN.bJ.{mhsa,mhsa_act}`; `embedN.{expansion,act}` for an
attention embedding (embedN sits between stageN and stageN+1, the paper's numbering).

`blocks(arch)` cuts a subnet into stem, embeddings, each MHSA, each FFN and the head. A piece's key
is its kind at its stage plus input shape and choices, never its index inside the stage, so the
latency table of a space has exactly the paper's "#n" entries per row (`piece_variants`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raynas import config as c
from raynas.nn.layers import conv_out_size
from raynas.space import Arch, SearchSpace
from raynas.space.space import Dim
from raynas.space.summary import per_block
from raynas.supernets.base import Block, StageSpec, Supernet, declared_fields
from raynas.supernets.scanedge_blocks import (
    DynamicAttentionEmbedding,
    DynamicConvEmbedding,
    DynamicDualFFN,
    DynamicHead,
    DynamicMHSA,
    DynamicStem,
    ffn_hidden,
)

FAMILY_KEYS = ("stem", "stages", "attention", "layer_scale_init", "head")
STAGE_KEYS = ("width", "depth", "ffn", "expansion", "kernel", "act", "embed", "mhsa")
EMBED_TYPES = ("conv", "mhsa_ds")
# String choices are ordered cheapest first, so `min_arch` / `max_arch` are the smallest / largest subnet.
FFN_ORDER = ("unified", "fused")
ACT_ORDER = ("relu", "gelu")
NO_MHSA = 0
ATTENTION_DEFAULTS = {"heads": 8, "key_dim": 32, "downsample_key_dim": 16, "bias_resolution": 224}


# ---- the validated stage table --------------------------------------------------------------------
@dataclass(frozen=True)
class MhsaSpec:
    expansions: tuple[int, ...]
    acts: tuple[str, ...]
    stride: int


@dataclass(frozen=True)
class EmbedSpec:
    type: str
    kernel: int
    expansions: tuple[int, ...] = ()
    acts: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScanEdgeStage(StageSpec):
    """A stage: FFN types and activations searched per block, an optional embedding in front and MHSA."""

    ffns: tuple[str, ...] = ()
    acts: tuple[str, ...] = ()
    embed: EmbedSpec | None = None
    mhsa: MhsaSpec | None = None

    @property
    def max_hidden(self) -> int:
        return ffn_hidden(self.widths[-1], self.expansions[-1])


@dataclass(frozen=True)
class ScanEdgeSpec:
    stem_kernel: int
    stem_acts: tuple[str, ...]
    stages: tuple[ScanEdgeStage, ...]
    heads: int
    key_dim: int
    downsample_key_dim: int
    bias_resolution: int
    layer_scale_init: float
    distillation: bool


def _widths(cfg: Mapping[str, Any], where: str) -> tuple[int, ...]:
    """`{min, max, step}` as in Table 5's "(min, max, step size)", or an explicit list."""
    w = f"{where}.width"
    if isinstance(cfg.get("width"), list):
        return c.int_choices(cfg["width"], w, as_set=True)
    spec = c.mapping(c.required(cfg, "width", where), w)
    c.check_known(spec, ("min", "max", "step"), w)
    lo, hi, step = (c.integer(c.required(spec, k, w), f"{w}.{k}", minimum=1) for k in ("min", "max", "step"))
    if hi < lo or (hi - lo) % step:
        c.fail(w, f"min {lo}, max {hi}, step {step} is not allowed", "min <= max and max - min a multiple of step")
    return tuple(range(lo, hi + 1, step))


def _embed(cfg: Mapping[str, Any], where: str) -> EmbedSpec:
    etype = c.choice(c.required(cfg, "type", where), f"{where}.type", EMBED_TYPES)
    c.check_known(cfg, ("type", "kernel") if etype == "conv" else ("type", "kernel", "expansion", "act"), where)
    kernel = c.integer(cfg.get("kernel", 3), f"{where}.kernel", minimum=1, odd=True)
    if etype == "conv":
        return EmbedSpec("conv", kernel)
    return EmbedSpec("mhsa_ds", kernel,
                     c.int_choices(c.required(cfg, "expansion", where), f"{where}.expansion", as_set=True),
                     c.names(c.required(cfg, "act", where), f"{where}.act", ACT_ORDER, sort=True))


def _mhsa(cfg: Mapping[str, Any], where: str) -> MhsaSpec:
    c.check_known(cfg, ("expansion", "act", "stride"), where)
    return MhsaSpec(c.int_choices(c.required(cfg, "expansion", where), f"{where}.expansion", as_set=True),
                    c.names(c.required(cfg, "act", where), f"{where}.act", ACT_ORDER, sort=True),
                    c.integer(cfg.get("stride", 1), f"{where}.stride", 1, 2))


def _parse_stage(cfg: Mapping[str, Any], where: str, first: bool) -> ScanEdgeStage:
    if first and cfg.get("embed") is not None:
        c.fail(f"{where}.embed", "not allowed on the first stage (the stem feeds it)")
    if not first and cfg.get("embed") is None:
        c.fail(f"{where}.embed", "missing; every stage after the first starts with an embedding", list(EMBED_TYPES))
    return ScanEdgeStage(
        widths=_widths(cfg, where),
        depths=c.int_choices(c.required(cfg, "depth", where), f"{where}.depth", as_set=True),
        ffns=c.names(c.required(cfg, "ffn", where), f"{where}.ffn", FFN_ORDER, sort=True),
        expansions=c.number_choices(c.required(cfg, "expansion", where), f"{where}.expansion", 0.25,
                                    low_open=False, as_set=True),
        kernels=c.int_choices(c.required(cfg, "kernel", where), f"{where}.kernel", odd=True, as_set=True),
        acts=c.names(c.required(cfg, "act", where), f"{where}.act", ACT_ORDER, sort=True),
        embed=None if first else _embed(c.mapping(cfg["embed"], f"{where}.embed"), f"{where}.embed"),
        mhsa=None if cfg.get("mhsa") is None else _mhsa(c.mapping(cfg["mhsa"], f"{where}.mhsa"), f"{where}.mhsa"),
    )


def parse_spec(cfg: Mapping[str, Any], where: str) -> ScanEdgeSpec:
    stem = c.mapping(c.required(cfg, "stem", where), f"{where}.stem")
    c.check_known(stem, ("kernel", "act"), f"{where}.stem")
    stages_cfg = c.mapping_list(c.required(cfg, "stages", where), f"{where}.stages", STAGE_KEYS)
    stages = tuple(_parse_stage(s, f"{where}.stages[{i}]", i == 0) for i, s in enumerate(stages_cfg))
    for i, s in enumerate(stages):
        if ffn_hidden(s.widths[0], s.expansions[0]) < 1:
            c.fail(f"{where}.stages[{i}].expansion", f"{s.expansions[0]} gives an empty FFN at width {s.widths[0]}",
                   "width * expansion >= 1")
    if stages[0].widths[0] < 2:
        c.fail(f"{where}.stages[0].width", f"{stages[0].widths[0]} is not allowed",
               ">= 2 (the stem's first conv has half the width)")
    attention = c.with_defaults(cfg.get("attention"), ATTENTION_DEFAULTS, f"{where}.attention")
    head = c.with_defaults(cfg.get("head"), {"distillation": False}, f"{where}.head")
    return ScanEdgeSpec(
        stem_kernel=c.integer(stem.get("kernel", 3), f"{where}.stem.kernel", minimum=1, odd=True),
        stem_acts=c.names(c.required(stem, "act", f"{where}.stem"), f"{where}.stem.act", ACT_ORDER, sort=True),
        stages=stages,
        **{key: c.integer(attention[key], f"{where}.attention.{key}", minimum=1) for key in ATTENTION_DEFAULTS},
        layer_scale_init=c.number(cfg.get("layer_scale_init", 1e-5), f"{where}.layer_scale_init", 0.0, low_open=True),
        distillation=c.boolean(head["distillation"], f"{where}.head.distillation"),
    )


# ---- dimension names ----------------------------------------------------------------------------
def stage_name(i: int) -> str:
    return f"stage{i + 1}"


def embed_name(i: int) -> str:
    """The embedding in front of stage i (0-based) is the paper's "Embed i" (Embed 1 feeds stage 2)."""
    return f"embed{i}"


def block_dim(i: int, j: int, field: str) -> str:
    return f"{stage_name(i)}.b{j}.{field}"


def block_fields(stage: ScanEdgeStage) -> list[tuple[str, tuple]]:
    """(field, choices) of one block of `stage`; `mhsa` 0 means no MHSA in front of the FFN."""
    fields = [("ffn", stage.ffns), ("expansion", stage.expansions), ("kernel", stage.kernels),
              ("act", stage.acts)]
    if stage.mhsa is not None:
        fields += [("mhsa", (NO_MHSA, *stage.mhsa.expansions)), ("mhsa_act", stage.mhsa.acts)]
    return fields


class ScanEdgeSpace(SearchSpace):
    """The SCAN-Edge space; `spec` is the validated stage table."""

    spec: ScanEdgeSpec

    def canonicalize(self, values: dict[str, Any]) -> dict[str, Any]:
        # Blocks past the depth, and the activation of an absent MHSA, do not exist: reset them to
        # their first choice so equal networks hash equal.
        for i, stage in enumerate(self.spec.stages):
            depth = values[f"{stage_name(i)}.depth"]
            for j in range(stage.depths[-1]):
                if j >= depth:
                    for field, choices in block_fields(stage):
                        values[block_dim(i, j, field)] = choices[0]
                elif stage.mhsa is not None and values[block_dim(i, j, "mhsa")] == NO_MHSA:
                    values[block_dim(i, j, "mhsa_act")] = stage.mhsa.acts[0]
        return values

    def arch_summary(self, arch: Mapping[str, Any]) -> str:
        """`stem g|32x2 u k3 e4 g|...|ds e4g 176x4 u k3 e4334 g m0044g`: the stem's activation, then per stage
        an attention embedding (`ds` expansion, activation), width x depth and its blocks' FFN type (u/f),
        kernels, expansions, activations (r/g) and MHSA expansions (0: none) with the active ones'
        activations; a field reads as one value when the blocks agree."""
        parts = [f"stem {_initial(arch['stem.act'])}"]
        for i, stage in enumerate(self.spec.stages):
            blocks = range(arch[f"{stage_name(i)}.depth"])
            ffn, kernel, expansion, act = (_per_block(arch, i, f, blocks)
                                           for f in ("ffn", "kernel", "expansion", "act"))
            text = f"{arch[f'{stage_name(i)}.width']}x{len(blocks)} {ffn} k{kernel} e{expansion} {act}"
            if stage.mhsa is not None:
                attending = [j for j in blocks if arch[block_dim(i, j, "mhsa")] != NO_MHSA]
                text += f" m{_per_block(arch, i, 'mhsa', blocks)}{_per_block(arch, i, 'mhsa_act', attending)}"
            if stage.embed is not None and stage.embed.type == "mhsa_ds":
                e = embed_name(i)
                text = f"ds e{arch[f'{e}.expansion']}{_initial(arch[f'{e}.act'])} {text}"
            parts.append(text)
        return "|".join(parts)

    def log10_cardinality(self) -> float:
        spec = self.spec
        networks = len(spec.stem_acts)
        for stage in spec.stages:
            per_block = len(stage.ffns) * len(stage.expansions) * len(stage.kernels) * len(stage.acts)
            if stage.mhsa is not None:
                per_block *= 1 + len(stage.mhsa.expansions) * len(stage.mhsa.acts)
            embed = 1
            if stage.embed is not None and stage.embed.type == "mhsa_ds":
                embed = len(stage.embed.expansions) * len(stage.embed.acts)
            networks *= len(stage.widths) * embed * sum(per_block**d for d in stage.depths)
        return math.log10(networks)


def _initial(value: Any) -> Any:
    """A string choice by its first letter in summaries (unified/fused, relu/gelu); numbers as they are."""
    return value[0] if isinstance(value, str) else value


def _per_block(arch: Mapping[str, Any], i: int, field: str, blocks: Iterable[int]) -> str:
    """Block field `field` of stage i over `blocks` for a summary ('' for no blocks)."""
    values = [_initial(arch[block_dim(i, j, field)]) for j in blocks]
    return per_block(values) if values else ""


def _dims(spec: ScanEdgeSpec) -> list[Dim]:
    dims = [Dim("stem.act", spec.stem_acts)]
    for i, stage in enumerate(spec.stages):
        if stage.embed is not None and stage.embed.type == "mhsa_ds":
            dims += [Dim(f"{embed_name(i)}.expansion", stage.embed.expansions),
                     Dim(f"{embed_name(i)}.act", stage.embed.acts)]
        dims += [Dim(f"{stage_name(i)}.width", stage.widths), Dim(f"{stage_name(i)}.depth", stage.depths)]
        for j in range(stage.depths[-1]):
            dims += [Dim(block_dim(i, j, f), c) for f, c in block_fields(stage)]
    return dims


def build_space(cfg: dict) -> ScanEdgeSpace:
    where = f"space {cfg['name']}"
    spec = parse_spec(cfg, where)
    space = ScanEdgeSpace(dims=tuple(_dims(spec)), **declared_fields(cfg))
    space.spec = spec
    return space


# ---- the supernet ---------------------------------------------------------------------------------
@dataclass
class Piece:
    """One sequential piece of a subnet: the dynamic module, its choices and its input (C, H, W)."""

    kind: str
    module: nn.Module
    choices: dict[str, Any]
    in_shape: tuple[int, ...]
    note: str = ""  # key-only facts that are not choices (the head's class count)

    @property
    def key(self) -> str:
        c, h, w = self.in_shape
        parts = [self.kind, f"in={c}x{h}x{w}"] + [f"{k}={v}" for k, v in self.choices.items()]
        return "|".join(parts + ([self.note] if self.note else []))


class ScanEdgeSupernet(Supernet):
    """Weight-entangled EfficientFormerV2 supernet over a `ScanEdgeSpace`.

    The attention-bias tables are sized for `attention.bias_resolution` of the YAML, not for the
    space's (overridable) resolution, so one checkpoint serves every input resolution: a smaller
    input uses the sub-table of its offsets, a larger one reuses the farthest learned offset.
    """

    def __init__(self, space: ScanEdgeSpace):
        super().__init__(space)
        spec = space.spec
        res = conv_out_size(conv_out_size(spec.bias_resolution, spec.stem_kernel, 2), spec.stem_kernel, 2)
        self.stem = DynamicStem(space.in_channels, spec.stages[0].widths[-1], spec.stem_kernel)
        self.embeds = nn.ModuleDict()
        self.stages = nn.ModuleList()
        prev_width = spec.stages[0].widths[-1]
        for i, stage in enumerate(spec.stages):
            width = stage.widths[-1]
            if stage.embed is not None:
                e = stage.embed
                if e.type == "conv":
                    self.embeds[embed_name(i)] = DynamicConvEmbedding(prev_width, width, e.kernel)
                else:
                    self.embeds[embed_name(i)] = DynamicAttentionEmbedding(
                        prev_width, width, e.kernel, spec.heads, spec.downsample_key_dim, e.expansions[-1], res)
                res = conv_out_size(res, e.kernel, 2)
            blocks = nn.ModuleList()
            for _ in range(stage.depths[-1]):
                block = nn.Module()
                if stage.mhsa is not None:
                    m = stage.mhsa
                    table = conv_out_size(res, 3, m.stride) if m.stride > 1 else res
                    block.mhsa = DynamicMHSA(width, spec.heads, spec.key_dim, m.expansions[-1], m.stride, table,
                                             spec.layer_scale_init)
                block.ffn = DynamicDualFFN(stage.ffns, width, stage.max_hidden, stage.kernels[-1],
                                           spec.layer_scale_init)
                blocks.append(block)
            self.stages.append(blocks)
            prev_width = width
        self.head = DynamicHead(prev_width, space.num_classes, spec.distillation)
        self._head_note = f"classes={space.num_classes}"

    # ---- the plan shared by forward, blocks and cost ------------------------------------------------
    def _pieces(self, arch: Mapping[str, Any], hw: tuple[int, int]) -> Iterator[Piece]:
        """The subnet's pieces in execution order, each with its input shape (shapes follow `hw`)."""
        spec, a = self.space.spec, arch
        width = a[f"{stage_name(0)}.width"]
        piece = Piece("stem", self.stem, {"width": width, "act": a["stem.act"]},
                      (self.space.in_channels, *hw))
        yield piece
        shape = self.stem.out_shape(piece.in_shape, **piece.choices)
        for i, stage in enumerate(spec.stages):
            s = stage_name(i)
            width = a[f"{s}.width"]
            if stage.embed is not None:
                e = embed_name(i)
                choices = {"width": width}
                if stage.embed.type == "mhsa_ds":
                    choices |= {"expansion": a[f"{e}.expansion"], "act": a[f"{e}.act"]}
                module = self.embeds[e]
                yield Piece(e, module, choices, shape)
                shape = module.out_shape(shape, **choices)
            for j in range(a[f"{s}.depth"]):
                block = self.stages[i][j]
                if stage.mhsa is not None and a[block_dim(i, j, "mhsa")] != NO_MHSA:
                    yield Piece(f"{s}.mhsa", block.mhsa, {"expansion": a[block_dim(i, j, "mhsa")],
                                                          "act": a[block_dim(i, j, "mhsa_act")]}, shape)
                yield Piece(f"{s}.ffn", block.ffn, {f: a[block_dim(i, j, f)] for f in
                                                    ("ffn", "expansion", "kernel", "act")}, shape)
        yield Piece("head", self.head, {}, shape, self._head_note)

    def _arch_values(self, arch: Mapping[str, Any] | None) -> dict[str, Any]:
        arch = self.space.max_arch() if arch is None else self.as_arch(arch)
        return arch.to_dict()

    def forward(self, x: torch.Tensor, arch: Mapping[str, Any] | None = None) -> torch.Tensor:
        for piece in self._pieces(self._arch_values(arch), tuple(x.shape[2:])):
            x = piece.module(x, **piece.choices)
        return x

    @torch.no_grad()
    def blocks(self, arch: Arch, resolution: int | None = None) -> list[Block]:
        r = resolution or self.space.resolution
        return [Block(p.key, p.module.static(p.in_shape, **p.choices), (1, *p.in_shape))
                for p in self._pieces(self._arch_values(arch), (r, r))]

    def cost(self, arch: Arch, resolution: int | None = None) -> dict[str, int]:
        r = resolution or self.space.resolution
        params = macs = 0
        for p in self._pieces(self._arch_values(arch), (r, r)):
            p_params, p_macs = p.module.cost(p.in_shape, **p.choices)
            params, macs = params + p_params, macs + p_macs
        return {"params": params, "macs": macs}

    @torch.no_grad()
    def block_variants(self, resolution: int | None = None) -> list[Block]:
        return [Block(key, module.static(shape, **choices), (1, *shape))
                for key, (module, choices, shape) in self.piece_variants(resolution).items()]

    def piece_variants(self, resolution: int | None = None) -> dict[str, tuple[nn.Module, dict, tuple]]:
        """Every distinct piece of the space at `resolution`: key -> (dynamic module, choices, in shape).

        This is what a per-block latency table must profile (`block_variants` builds each with
        `module.static(in_shape, **choices)`); the counts per row equal Table 5's "#n" column.
        """
        r = resolution or self.space.resolution
        spec = self.space.spec
        variants: dict[str, tuple[nn.Module, dict, tuple]] = {}

        def add(kind, module, choices, shape, note=""):
            piece = Piece(kind, module, choices, shape, note)
            variants.setdefault(piece.key, (module, choices, shape))

        hw = (r, r)
        in_shape = (self.space.in_channels, *hw)
        for width, act in itertools.product(spec.stages[0].widths, spec.stem_acts):
            add("stem", self.stem, {"width": width, "act": act}, in_shape)
        hw = self.stem.out_shape(in_shape, spec.stages[0].widths[0], spec.stem_acts[0])[1:]
        prev_widths = spec.stages[0].widths
        for i, stage in enumerate(spec.stages):
            s = stage_name(i)
            if stage.embed is not None:
                e, module = embed_name(i), self.embeds[embed_name(i)]
                extra = [{}]
                if stage.embed.type == "mhsa_ds":
                    extra = [{"expansion": x, "act": a}
                             for x, a in itertools.product(stage.embed.expansions, stage.embed.acts)]
                for cin, cout, more in itertools.product(prev_widths, stage.widths, extra):
                    add(e, module, {"width": cout, **more}, (cin, *hw))
                hw = module.out_shape((prev_widths[0], *hw), stage.widths[0], **extra[0])[1:]
            block = self.stages[i][0]
            for width in stage.widths:
                if stage.mhsa is not None:
                    for x, a in itertools.product(stage.mhsa.expansions, stage.mhsa.acts):
                        add(f"{s}.mhsa", block.mhsa, {"expansion": x, "act": a}, (width, *hw))
                for f, x, k, a in itertools.product(stage.ffns, stage.expansions, stage.kernels, stage.acts):
                    add(f"{s}.ffn", block.ffn, {"ffn": f, "expansion": x, "kernel": k, "act": a}, (width, *hw))
            prev_widths = stage.widths
        for width in prev_widths:
            add("head", self.head, {}, (width, *hw), self._head_note)
        return variants


def build_supernet(space: ScanEdgeSpace, **kwargs: Any) -> ScanEdgeSupernet:
    if kwargs:
        raise TypeError(f"scanedge supernet: unexpected options {sorted(kwargs)}")
    return ScanEdgeSupernet(space)


__all__ = ["ScanEdgeSpace", "ScanEdgeSupernet", "build_space", "build_supernet"]
