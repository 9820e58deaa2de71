"""AutoViT hybrid supernets (seed 001, Table 1): conv stem, MBConv stages, MobileViT-style transformer stages.

A space (`spaces/autovit-*.yaml`) declares the stage table: the stem, the MBConv stages (width,
depth, expansion, kernel, stride) and the transformer stages (width, depth, heads, MLP ratio,
stride), how many transformer stages a subnet may use, and the MBPool head widths. One
weight-entangled supernet holds every subnet: each stage stores its widest / deepest weights and a
subnet takes prefixes (channels, heads, MLP hidden units, layers). A transformer stage is an
MBConv transition (stride and width change, as MobileViT puts an MV2 block before each MobileViT
block) followed by one MobileViT block with `depth` transformer layers (`autovit_blocks.py`).

Weight inheritance across supernets (AutoViT §3.2: "smaller subnets inherit shared parameters from
larger supernets"): the three built-in spaces share one layout (same stages, same maximum depths,
same head_dim), so `inherit_weights(src, dst)` copies the overlapping prefix of every tensor of a
larger supernet into a smaller one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raynas import config as c
from raynas.nn.layers import conv_out_size
from raynas.space import Arch, SearchSpace
from raynas.space.space import Dim, SpaceError
from raynas.space.summary import short
from raynas.supernets.autovit_blocks import (
    DynamicMBPoolHead,
    DynamicMobileVitBlock,
    conv_bn_silu,
    mbconv,
    mbconv_choice,
    patch_size_for,
)
from raynas.supernets.base import Block, StageSpec, Supernet, declared_fields

FAMILY_KEYS = ("patch_size", "head_dim", "kernel", "transition_expansion", "stem", "conv_stages",
               "transformer_stages", "num_transformer_stages", "head")
STEM_KEYS = ("widths", "kernel", "stride")
CONV_STAGE_KEYS = ("name", "widths", "depths", "expansion", "kernel", "stride")
TRANSFORMER_STAGE_KEYS = ("name", "widths", "depths", "heads", "mlp_ratios", "stride")
HEAD_KEYS = ("widths", "expansion")
NUM_STAGES_DIM = "transformer.stages"
_STAGE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def mlp_hidden(width: int, mlp_ratio: float) -> int:
    return int(round(width * mlp_ratio))


# ---- declaration ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvStage(StageSpec):
    """MBConv blocks; `name` prefixes the stage's dims."""

    name: str = ""


@dataclass(frozen=True)
class TransformerStage(StageSpec):
    """An MV2 transition and one MobileViT block of `depths` transformer layers."""

    name: str = ""
    heads: tuple[int, ...] = ()
    mlp_ratios: tuple[float, ...] = ()


@dataclass(frozen=True)
class AutoVitSpec:
    """The validated family keys of an AutoViT YAML (the stage table)."""

    patch_size: int
    head_dim: int
    kernel: int  # transition depthwise, MobileViT local and fusion convs
    transition_expansion: float
    stem_widths: tuple[int, ...]
    stem_kernel: int
    stem_stride: int
    conv_stages: tuple[ConvStage, ...]
    transformer_stages: tuple[TransformerStage, ...]
    num_stages: tuple[int, ...]  # how many transformer stages (a prefix) a subnet uses
    head_widths: tuple[int, ...]
    head_expansion: float | None  # None: MobileViT head; a number: NASViT's MBPool expansion


def _stage_name(cfg: Mapping, where: str, seen: set) -> str:
    name = c.string(c.required(cfg, "name", where), f"{where}.name")
    if not _STAGE_NAME.match(name) or name in seen or name in ("stem", "head", "transformer"):
        c.fail(f"{where}.name", f"{name!r} is not allowed",
               f"a new lowercase identifier other than stem/head/transformer (taken: {sorted(seen)})")
    seen.add(name)
    return name


def _mbconv_choices(st: Mapping, w: str) -> dict:
    expansions = c.number_choices(c.as_list(st.get("expansion", 1)), f"{w}.expansion", 1.0, low_open=False,
                                  as_set=True)
    return {"expansions": tuple(map(float, expansions)),
            "kernels": c.int_choices(c.as_list(st.get("kernel", 3)), f"{w}.kernel", odd=True, as_set=True)}


def _transformer_choices(st: Mapping, w: str) -> dict:
    ratios = c.number_choices(c.as_list(c.required(st, "mlp_ratios", w)), f"{w}.mlp_ratios", 0.25, low_open=False,
                              as_set=True)
    return {"heads": c.int_choices(c.as_list(c.required(st, "heads", w)), f"{w}.heads", as_set=True),
            "mlp_ratios": tuple(map(float, ratios))}


def _stages(cfg: Mapping, key: str, keys: tuple[str, ...], where: str, seen: set, cls: type,
            own_fields: Callable[[Mapping, str], dict]) -> tuple:
    """The stages under `key`: the fields every stage has, plus `own_fields(stage, where)`."""
    out = []
    for i, st in enumerate(c.mapping_list(c.required(cfg, key, where), f"{where}.{key}", keys)):
        w = f"{where}.{key}[{i}]"
        out.append(cls(name=_stage_name(st, w, seen),
                       widths=c.int_choices(c.as_list(c.required(st, "widths", w)), f"{w}.widths", as_set=True),
                       depths=c.int_choices(c.as_list(c.required(st, "depths", w)), f"{w}.depths", as_set=True),
                       **own_fields(st, w),
                       stride=c.integer(c.required(st, "stride", w), f"{w}.stride", 1, 2)))
    return tuple(out)


def parse_spec(cfg: Mapping[str, Any], where: str) -> AutoVitSpec:
    ws, wh = f"{where}.stem", f"{where}.head"
    stem = c.mapping(c.required(cfg, "stem", where), ws)
    c.check_known(stem, STEM_KEYS, ws)
    seen: set[str] = set()
    conv_stages = _stages(cfg, "conv_stages", CONV_STAGE_KEYS, where, seen, ConvStage, _mbconv_choices)
    transformer_stages = _stages(cfg, "transformer_stages", TRANSFORMER_STAGE_KEYS, where, seen, TransformerStage,
                                 _transformer_choices)
    n = len(transformer_stages)
    num_stages = c.int_choices(c.as_list(cfg.get("num_transformer_stages", n)), f"{where}.num_transformer_stages",
                               as_set=True)
    if num_stages[-1] > n:
        c.fail(f"{where}.num_transformer_stages", f"{num_stages[-1]} is not allowed",
               f"1..{n} (the number of transformer_stages)")
    head = c.mapping(c.required(cfg, "head", where), wh)
    c.check_known(head, HEAD_KEYS, wh)
    return AutoVitSpec(
        patch_size=c.integer(c.required(cfg, "patch_size", where), f"{where}.patch_size", minimum=1),
        head_dim=c.integer(c.required(cfg, "head_dim", where), f"{where}.head_dim", minimum=1),
        kernel=c.integer(cfg.get("kernel", 3), f"{where}.kernel", minimum=1, odd=True),
        transition_expansion=c.number(cfg.get("transition_expansion", 1), f"{where}.transition_expansion", 1.0),
        stem_widths=c.int_choices(c.as_list(c.required(stem, "widths", ws)), f"{ws}.widths", as_set=True),
        stem_kernel=c.integer(stem.get("kernel", 3), f"{ws}.kernel", minimum=1, odd=True),
        stem_stride=c.integer(stem.get("stride", 2), f"{ws}.stride", 1, 2),
        conv_stages=conv_stages,
        transformer_stages=transformer_stages,
        num_stages=num_stages,
        head_widths=c.int_choices(c.as_list(c.required(head, "widths", wh)), f"{wh}.widths", as_set=True),
        head_expansion=c.number(head.get("expansion"), f"{wh}.expansion", 1.0, optional=True),
    )


# ---- space ----------------------------------------------------------------------------------------
class AutoVitSpace(SearchSpace):
    """Flat dims such as `stem.width`, `mb2.depth`, `t3.heads`, `transformer.stages`, `head.width`.

    A choice list with one value is fixed (no dim). Transformer stages beyond the sampled stage
    count are inactive; `canonicalize` resets their dims so equal networks hash equal.
    """

    spec: AutoVitSpec

    def value(self, arch: Mapping[str, Any], name: str, choices: tuple) -> Any:
        return arch[name] if len(choices) > 1 else choices[0]

    def active_stages(self, arch: Mapping[str, Any]) -> int:
        return self.value(arch, NUM_STAGES_DIM, self.spec.num_stages)

    def canonicalize(self, values: dict[str, Any]) -> dict[str, Any]:
        for st in self.spec.transformer_stages[self.active_stages(values):]:
            for field, choices in _transformer_fields(st):
                if len(choices) > 1:
                    values[f"{st.name}.{field}"] = choices[0]
        return values

    def arch_summary(self, arch: Mapping[str, Any]) -> str:
        """`s16|24x1|32x2|48x2|T64x2 h7 r1.5|...|head1280`: stem width, each MBConv stage's width x depth (and
        expansion, kernel where searched), each active transformer stage's width x depth, heads and MLP
        ratio, and the head width."""
        spec = self.spec
        parts = [f"s{self.value(arch, 'stem.width', spec.stem_widths)}"]
        for st in spec.conv_stages:
            (_, widths), (_, depths), *searched = _conv_fields(st)
            text = f"{self.value(arch, f'{st.name}.width', widths)}x{self.value(arch, f'{st.name}.depth', depths)}"
            for (field, choices), letter in zip(searched, "ek"):
                if len(choices) > 1:
                    text += f" {letter}{short(arch[f'{st.name}.{field}'])}"
            parts.append(text)
        for st in spec.transformer_stages[: self.active_stages(arch)]:
            width, depth, heads, ratio = (short(self.value(arch, f"{st.name}.{f}", choices))
                                          for f, choices in _transformer_fields(st))
            parts.append(f"T{width}x{depth} h{heads} r{ratio}")
        parts.append(f"head{self.value(arch, 'head.width', spec.head_widths)}")
        return "|".join(parts)

    def log10_cardinality(self) -> float:
        """Exact count of distinct networks: inactive transformer stages contribute one setting."""
        spec = self.spec
        fixed = len(spec.stem_widths) * len(spec.head_widths)
        for st in spec.conv_stages:
            fixed *= len(st.widths) * len(st.depths) * len(st.expansions) * len(st.kernels)
        per_stage = [math.prod(len(c) for _, c in _transformer_fields(st)) for st in spec.transformer_stages]
        networks = fixed * sum(math.prod(per_stage[:n]) for n in spec.num_stages)
        return math.log10(networks)


def _conv_fields(st: ConvStage) -> tuple[tuple[str, tuple], ...]:
    return (("width", st.widths), ("depth", st.depths), ("expansion", st.expansions), ("kernel", st.kernels))


def _transformer_fields(st: TransformerStage) -> tuple[tuple[str, tuple], ...]:
    return (("width", st.widths), ("depth", st.depths), ("heads", st.heads), ("mlp_ratio", st.mlp_ratios))


def build_space(cfg: dict) -> AutoVitSpace:
    where = f"space {cfg['name']}"
    spec = parse_spec(cfg, where)
    dims = []

    def add(dim_name: str, choices: tuple) -> None:
        if len(choices) > 1:
            dims.append(Dim(dim_name, choices))

    add("stem.width", spec.stem_widths)
    for st in spec.conv_stages:
        for field, choices in _conv_fields(st):
            add(f"{st.name}.{field}", choices)
    add(NUM_STAGES_DIM, spec.num_stages)
    for st in spec.transformer_stages:
        for field, choices in _transformer_fields(st):
            add(f"{st.name}.{field}", choices)
    add("head.width", spec.head_widths)
    space = AutoVitSpace(dims=tuple(dims), **declared_fields(cfg, resolution=256))
    space.spec = spec
    return space


# ---- a subnet as a flat plan ------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvStep:
    """One MBConv (also the transition of a transformer stage)."""

    where: str  # module path inside the supernet
    out: int
    expansion: float
    kernel: int
    stride: int

    def choice(self, in_ch: int) -> dict:
        return mbconv_choice(in_ch, self.out, self.expansion, self.stride)


@dataclass(frozen=True)
class VitStep:
    where: str
    width: int
    depth: int
    heads: int
    mlp_ratio: float


def subnet_plan(space: AutoVitSpace, arch: Mapping[str, Any]) -> tuple[int, list, int]:
    """(stem width, ordered conv / MobileViT steps, head width) of `arch`: the one place that reads the arch."""
    spec = space.spec
    steps: list = []
    for i, st in enumerate(spec.conv_stages):
        width, depth, expansion, kernel = (space.value(arch, f"{st.name}.{f}", c) for f, c in _conv_fields(st))
        for j in range(depth):
            steps.append(ConvStep(f"conv_stages.{i}.{j}", width, expansion, kernel, st.stride if j == 0 else 1))
    for i, st in enumerate(spec.transformer_stages[: space.active_stages(arch)]):
        width, depth, heads, ratio = (space.value(arch, f"{st.name}.{f}", c) for f, c in _transformer_fields(st))
        steps.append(ConvStep(f"transitions.{i}", width, spec.transition_expansion, spec.kernel, st.stride))
        steps.append(VitStep(f"vit_blocks.{i}", width, depth, heads, ratio))
    return space.value(arch, "stem.width", spec.stem_widths), steps, space.value(arch, "head.width", spec.head_widths)


# ---- supernet -------------------------------------------------------------------------------------
class AutoVitSupernet(Supernet):
    """Weight-entangled AutoViT supernet; `forward(x, None)` runs the largest subnet (the teacher)."""

    space: AutoVitSpace

    def __init__(self, space: AutoVitSpace):
        super().__init__(space)
        spec = space.spec
        self.stem = conv_bn_silu(space.in_channels, spec.stem_widths[-1], spec.stem_kernel, spec.stem_stride)
        prev = spec.stem_widths[-1]
        stages = []
        for st in spec.conv_stages:
            blocks = []
            for j in range(st.depths[-1]):
                blocks.append(mbconv(prev if j == 0 else st.widths[-1], st.widths[-1], st.expansions[-1],
                                     st.kernels[-1], st.stride if j == 0 else 1))
            stages.append(nn.ModuleList(blocks))
            prev = st.widths[-1]
        self.conv_stages = nn.ModuleList(stages)
        transitions, vit_blocks = [], []
        for st in spec.transformer_stages:
            transitions.append(mbconv(prev, st.widths[-1], spec.transition_expansion, spec.kernel, st.stride))
            vit_blocks.append(DynamicMobileVitBlock(
                st.widths[-1], st.depths[-1], st.heads[-1], mlp_hidden(st.widths[-1], st.mlp_ratios[-1]),
                spec.head_dim, spec.kernel, spec.patch_size))
            prev = st.widths[-1]
        self.transitions = nn.ModuleList(transitions)
        self.vit_blocks = nn.ModuleList(vit_blocks)
        # The head reads the last *active* stage, which may be any stage from the smallest stage count on.
        head_in = max(st.widths[-1] for st in spec.transformer_stages[spec.num_stages[0] - 1:])
        self.head = DynamicMBPoolHead(head_in, spec.head_expansion, spec.head_widths[-1], space.num_classes)

    def _module(self, where: str) -> nn.Module:
        return self.get_submodule(where)

    def forward(self, x: torch.Tensor, arch: Mapping[str, Any] | None = None) -> torch.Tensor:
        arch = self.space.max_arch() if arch is None else self.as_arch(arch)
        stem_width, steps, head_width = subnet_plan(self.space, arch)
        x = self.stem(x, stem_width)
        for step in steps:
            module = self._module(step.where)
            if isinstance(step, ConvStep):
                x = module(x, step.out, kernel=step.kernel, **step.choice(x.shape[1]))
            else:
                x = module(x, step.depth, step.heads, mlp_hidden(step.width, step.mlp_ratio))
        return self.head(x, head_width)

    @torch.no_grad()
    def blocks(self, arch: Arch, resolution: int | None = None) -> list[Block]:
        stem_width, steps, head_width = subnet_plan(self.space, arch)
        c, h, w = self.input_shape(1, resolution)[1:]
        spec = self.space.spec
        out = [Block(f"stem:k{spec.stem_kernel},s{spec.stem_stride},c{stem_width}@{c}x{h}x{w}",
                     self.stem.static(c, stem_width), (1, c, h, w))]
        k, s = spec.stem_kernel, spec.stem_stride
        c, h, w = stem_width, conv_out_size(h, k, s), conv_out_size(w, k, s)
        for step in steps:
            module, shape = self._module(step.where), (1, c, h, w)
            if isinstance(step, ConvStep):
                key = f"mbconv:c{step.out},e{step.expansion:g},k{step.kernel},s{step.stride}@{c}x{h}x{w}"
                out.append(Block(key, module.static(c, step.out, kernel=step.kernel, **step.choice(c)), shape))
                h, w = conv_out_size(h, step.kernel, step.stride), conv_out_size(w, step.kernel, step.stride)
                c = step.out
            else:
                hidden = mlp_hidden(step.width, step.mlp_ratio)
                key = (f"mobilevit:c{step.width},L{step.depth},h{step.heads}x{spec.head_dim},mlp{hidden},"
                       f"p{patch_size_for(h, w, spec.patch_size)}@{c}x{h}x{w}")
                out.append(Block(key, module.static(c, step.depth, step.heads, hidden), shape))
        expansion = "" if spec.head_expansion is None else f"e{spec.head_expansion:g},"
        key = f"mbpool:{expansion}c{head_width},n{self.space.num_classes}@{c}x{h}x{w}"
        out.append(Block(key, self.head.static(c, head_width), (1, c, h, w)))
        return out

    def cost(self, arch: Arch, resolution: int | None = None) -> dict[str, int]:
        """Exact params and MACs of the extracted subnet (conv / linear / attention matmuls), analytically."""
        spec = self.space.spec
        stem_width, steps, head_width = subnet_plan(self.space, arch)
        c, h, w = self.input_shape(1, resolution)[1:]
        h, w = (conv_out_size(s, spec.stem_kernel, spec.stem_stride) for s in (h, w))
        parts = [self.stem.cost(c, stem_width, spec.stem_kernel, (h, w))]
        c = stem_width
        for step in steps:
            module = self._module(step.where)
            if isinstance(step, ConvStep):
                parts.append(module.cost(c, step.out, step.choice(c)["hidden"], step.kernel, (h, w)))
                h, w = conv_out_size(h, step.kernel, step.stride), conv_out_size(w, step.kernel, step.stride)
                c = step.out
            else:
                parts.append(module.cost(c, step.depth, step.heads, mlp_hidden(c, step.mlp_ratio), (h, w)))
        parts.append(self.head.cost(c, head_width, (h, w)))
        return {"params": sum(p for p, _ in parts), "macs": sum(m for _, m in parts)}


def build_supernet(space: AutoVitSpace, **kwargs: Any) -> AutoVitSupernet:
    if kwargs:
        raise SpaceError(f"autovit supernet: unknown options {sorted(kwargs)}; allowed: none")
    return AutoVitSupernet(space)


# ---- weight inheritance across supernets --------------------------------------------------------------
@torch.no_grad()
def inherit_weights(src: Supernet, dst: Supernet) -> dict[str, Any]:
    """Copy every overlapping weight slice of `src` (a larger AutoViT supernet) into `dst`.

    Tensors pair by name (same stage / block / layer index); each copies its shared prefix on every
    axis (channels, heads x head_dim, MLP hidden units, classes) and the centred part of conv kernels.
    BatchNorm running statistics are copied the same way, so a subnet present in both spaces
    computes identically afterwards. Returns counts: `tensors` (copied), `elements` (copied),
    `complete` (dst tensors entirely filled), and `skipped` (dst names with no counterpart in src).
    """
    if not isinstance(src, AutoVitSupernet) or not isinstance(dst, AutoVitSupernet):
        raise SpaceError("inherit_weights: both supernets must be autovit supernets")
    a, b = src.space.spec, dst.space.spec
    if a.head_dim != b.head_dim:
        raise SpaceError(f"inherit_weights: head_dim differs ({a.head_dim} vs {b.head_dim}); "
                         f"heads can only be inherited between spaces with the same head_dim")
    if a.head_expansion != b.head_expansion:  # MobileViT head vs NASViT MBPool: different layers
        raise SpaceError(f"inherit_weights: head.expansion differs ({a.head_expansion} vs {b.head_expansion})")
    src_state = src.state_dict()
    tensors = elements = complete = 0
    skipped = []
    for name, target in dst.state_dict().items():
        source = src_state.get(name)
        if source is None or source.dim() != target.dim():
            skipped.append(name)
            continue
        if target.dim() == 0:
            target.copy_(source)
            tensors, elements, complete = tensors + 1, elements + 1, complete + 1
            continue
        shared = [min(x, y) for x, y in zip(source.shape, target.shape)]
        src_idx = [slice(0, m) for m in shared]
        dst_idx = [slice(0, m) for m in shared]
        if target.dim() in (4, 5) and source.shape[-1] != target.shape[-1]:
            for axis in (-2, -1):  # centred kernels
                k_src, k_dst = source.shape[axis], target.shape[axis]
                m = min(k_src, k_dst)
                src_idx[axis] = slice((k_src - m) // 2, (k_src - m) // 2 + m)
                dst_idx[axis] = slice((k_dst - m) // 2, (k_dst - m) // 2 + m)
        target[tuple(dst_idx)] = source[tuple(src_idx)]
        n = math.prod(shared)
        tensors, elements = tensors + 1, elements + n
        complete += int(n == target.numel())
    return {"tensors": tensors, "elements": elements, "complete": complete, "skipped": skipped}
