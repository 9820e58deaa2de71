"""Reference models of a space: the well-known networks it holds (a MobileNetV3-Large-shaped subnet of mbv3,
EfficientFormerV2-S0 in scanedge, ...), declared under `references:` in the space's YAML and checked against
the space when it loads, so a reference that the space does not hold is a one-line error naming it.

A search exports and measures them beside its front, on the same device at the same precision
(raynas.report.references): the report then says where the front stands against the models everyone knows.

    references:
      <name>:
        description: <optional text>
        arch: {<field or pattern>: <choice>, ...}

`arch` gives every field of the space, by name or through a shell-style pattern (`stage3.b*.kernel: 3`,
`"*.act": gelu`): a field named exactly takes that value, else the value of the patterns matching it. Two
patterns that give one field different values are refused (the result would hang on their order). The value
`min` / `max` is the field's first / last choice, so a reference survives a resolution override
(`resolution: max` is 224 in the declared space and 32 in the same space loaded at 32 px).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from raynas import config as c
from raynas.space.arch import Arch
from raynas.space.space import SearchSpace, SpaceError

EXTREMES = ("min", "max")


@dataclass(frozen=True)
class Reference:
    name: str
    arch: Arch
    description: str = ""


def _is_pattern(key: str) -> bool:
    return any(ch in key for ch in "*?[")


def expand_arch(space: SearchSpace, spec: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The field values `spec` (names and patterns) gives; fields it misses are left to `space.validate`."""
    values: dict[str, Any] = {}
    by_pattern: dict[str, tuple[str, Any]] = {}  # field -> (the pattern that set it, its value)
    for key, value in spec.items():
        key = str(key)
        if not _is_pattern(key):
            values[key] = value
            continue
        matched = [name for name in space.dim_names if fnmatch.fnmatchcase(name, key)]
        if not matched:
            c.fail(f"{where}.{key}", "matches no field", f"patterns over the fields of space '{space.name}'")
        for name in matched:
            earlier = by_pattern.setdefault(name, (key, value))
            if earlier[1] != value:
                c.fail(f"{where}.{key}", f"gives '{name}' {value!r} where '{earlier[0]}' gives {earlier[1]!r}",
                       "patterns that agree, or the field named exactly")
    for name, (_, value) in by_pattern.items():
        values.setdefault(name, value)  # a field named exactly wins over the patterns
    for name, value in values.items():
        if value in EXTREMES and name in space.dim_names and value not in space.dim(name).choices:
            values[name] = space.dim(name).choices[0 if value == "min" else -1]
    return values


def parse_references(space: SearchSpace, cfg: Any, where: str) -> dict[str, Reference]:
    """The `references:` of a space declaration, each validated against `space`."""
    if cfg is None:
        return {}
    out = {}
    for name, item in c.mapping(cfg, where).items():
        w = f"{where}.{name}"
        item = c.mapping(item, w)
        arch_spec = c.mapping(c.required(item, "arch", w), f"{w}.arch")
        item = c.with_defaults(item, {"arch": None, "description": None}, w)
        description = c.string(item["description"], f"{w}.description", optional=True) or ""
        try:
            arch = space.validate(expand_arch(space, arch_spec, f"{w}.arch"))
        except SpaceError as exc:
            raise SpaceError(f"{w}: {exc}") from None
        out[str(name)] = Reference(str(name), arch, description)
    return out
