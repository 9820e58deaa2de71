"""Small helpers for validating YAML configs before any compute: one line naming the field."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from raynas.errors import ConfigError


def read_yaml(path: str | Path, what: str = "config") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: file {path} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{what}: {path} is malformed YAML{where}") from None
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{what}: {path} must hold a mapping at the top level")
    return cfg


def section(cfg: Mapping[str, Any], key: str, defaults: Mapping[str, Any], where: str | None = None) -> dict:
    """`cfg[key]` merged over `defaults`, refusing keys that `defaults` does not name."""
    where = where or key
    value = cfg.get(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    check_known(value, defaults, where)
    return {**defaults, **value}


def check_known(value: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    allowed = list(allowed)
    for key in value:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown field; allowed: {allowed}")


def positive_int(value: Any, where: str, minimum: int = 1, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{where}: expected an integer >= {minimum}, got {value!r}")
    return value


def positive_float(value: Any, where: str, optional: bool = False, maximum: float | None = None) -> float | None:
    if value is None and optional:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if not ok or (maximum is not None and value > maximum):
        bound = f" and <= {maximum}" if maximum is not None else ""
        raise ConfigError(f"{where}: expected a number > 0{bound}, got {value!r}")
    return float(value)


def one_of(value: Any, allowed: Iterable[Any], where: str) -> Any:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{where}: {value!r} is not allowed; allowed: {allowed}")
    return value
