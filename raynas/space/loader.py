"""Load search spaces declared in YAML (`spaces/*.yaml`, or a user's own file)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from raynas import config as c
from raynas.errors import ConfigError
from raynas.registry import Registry
from raynas.space.references import parse_references
from raynas.space.space import SearchSpace, SpaceError

# family name -> module declaring `FAMILY_KEYS` (its YAML keys besides COMMON_KEYS) and implementing
# `build_space(cfg) -> SearchSpace` and `build_supernet(space, **kw)`
FAMILIES = Registry("family", {
    "nb201": "raynas.supernets.nb201",
    "uib": "raynas.supernets.uib",
    "autovit": "raynas.supernets.autovit",
    "autoformer": "raynas.supernets.autoformer",
    "scanedge": "raynas.supernets.scanedge",
    "mbv3": "raynas.supernets.mbv3",
}, error=SpaceError)

COMMON_KEYS = ("name", "family", "description", "resolution", "num_classes", "in_channels", "references")


def builtin_spaces_dir() -> Path:
    """`spaces/` ships inside the wheel as raynas/spaces; an editable checkout keeps it at the root."""
    pkg = Path(__file__).resolve().parents[1]
    for candidate in (pkg / "spaces", pkg.parent / "spaces"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("built-in spaces directory not found (expected raynas/spaces or ./spaces)")


def builtin_space_names() -> list[str]:
    return sorted(p.stem for p in builtin_spaces_dir().glob("*.yaml"))


def read_space_yaml(path: str | Path) -> dict:
    """A space declaration; one line naming the file when it is not a YAML mapping."""
    return c.read_yaml(str(path), "space")


def family_module(family: str):
    return FAMILIES.get(family)


def space_from_config(cfg: Mapping[str, Any], **overrides: Any) -> SearchSpace:
    """Build a space from a parsed YAML mapping. `overrides` replace common keys (num_classes, ...)."""
    cfg = dict(cfg)
    for key, value in overrides.items():
        if value is not None:
            if key not in ("resolution", "num_classes", "in_channels"):
                raise SpaceError(f"override '{key}': allowed overrides are resolution, num_classes, in_channels")
            cfg[key] = value
    try:
        name = c.string(c.required(cfg, "name", "space"), "space.name")
        family = c.string(c.required(cfg, "family", f"space {name}"), f"space {name}.family")
        for key in ("resolution", "num_classes", "in_channels"):
            if key in cfg:
                c.integer(cfg[key], f"space {name}.{key}", minimum=1)
        module = family_module(family)
        c.check_known(cfg, COMMON_KEYS + module.FAMILY_KEYS, f"space {name}")
        space = module.build_space(cfg)
        space.references = parse_references(space, cfg.get("references"), f"space {name}.references")
    except ConfigError as exc:  # the one place a family's config-layer error becomes the space's error type
        raise SpaceError(str(exc)) from None
    space.config = dict(cfg)  # the full declaration, so a checkpoint can rebuild exactly this space
    return space


def load_space(name_or_path: str | Path, **overrides: Any) -> SearchSpace:
    """A built-in space by name (`nb201`, `autovit-s`, ...) or a YAML file path."""
    text = str(name_or_path)
    path = Path(text)
    if text.endswith((".yaml", ".yml")) or path.is_file():
        return space_from_config(read_space_yaml(path), **overrides)
    names = builtin_space_names()
    if text not in names:
        raise SpaceError(f"space: unknown '{text}'; allowed: {names} or a path to a .yaml file")
    return space_from_config(read_space_yaml(builtin_spaces_dir() / f"{text}.yaml"), **overrides)
