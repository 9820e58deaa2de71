"""The one config layer: YAML reading, dotted overrides, sections with defaults, typed field checks.

Every config and space file is validated through these functions, whole, before any compute or Ray starts.
Every failure is one `ConfigError` line in one wording:

    <dotted.field>: <what was wrong>; allowed: <what is>
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn

import yaml

from raynas.errors import ConfigError


def fail(field: str, problem: str, allowed: Any = None) -> NoReturn:
    """Raise the one-line error; `allowed` (a description or a list) says what would have been accepted."""
    raise ConfigError(f"{field}: {problem}" + ("" if allowed is None else f"; allowed: {allowed}"))


def join(where: str, key: Any) -> str:
    """The dotted name of `key` inside `where` (`where` may be empty at the top level)."""
    return f"{where}.{key}" if where else str(key)


def nested(where: str, validate: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run the validator of a config embedded at `where` (a pipeline's `train:`), naming a bad field by its
    place in the enclosing config (`train.epochs`, not `epochs`)."""
    try:
        return validate(*args, **kwargs)
    except ConfigError as exc:
        msg = str(exc)
        if msg.startswith(("config.", "config:")):  # the embedded config's own top level
            msg = msg[len("config"):].lstrip(".")
        raise ConfigError(f"{where}{'' if msg.startswith(':') else '.'}{msg}") from None


# ---- files and overrides -----------------------------------------------------------------------
def read_yaml(location: str, what: str = "config") -> dict[str, Any]:
    """A YAML mapping from a local path or URI. `yaml.safe_load` only: a config never constructs objects."""
    from raynas import storage

    if not storage.is_file(location):
        fail(what, f"file {storage.display(location)} does not exist")
    try:
        text = storage.read_bytes(location, what).decode("utf-8")
        cfg = yaml.safe_load(text)
    except UnicodeDecodeError:
        fail(what, f"{storage.display(location)} is not a text (YAML) file")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        fail(what, f"{storage.display(location)} is malformed YAML{line}")
    except (ValueError, RecursionError) as exc:  # e.g. a date like 2001-13-14, or absurd nesting
        fail(what, f"{storage.display(location)} is malformed YAML ({str(exc)[:80] or type(exc).__name__})")
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        fail(what, f"{storage.display(location)} must hold a mapping at the top level, got {type(cfg).__name__}")
    return cfg


def apply_overrides(cfg: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Set dotted keys (`{"scaling.num_workers": 2}`) in `cfg`, creating sections; None values are skipped."""
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = cfg
        *parents, leaf = dotted.split(".")
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                fail(".".join(parents[: depth + 1]), f"expected a mapping, got {node!r}")
        node[leaf] = value
    return cfg


# ---- structure ---------------------------------------------------------------------------------
def mapping(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        fail(field, f"expected a mapping, got {value!r}")
    return dict(value)


def check_known(value: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    """Refuse the first key of `value` that `allowed` does not name."""
    allowed = list(allowed)
    for key in value:
        if key not in allowed:
            fail(join(where, key), "unknown field", sorted(map(str, allowed)))


def mapping_list(value: Any, field: str, allowed: Iterable[str]) -> list[dict[str, Any]]:
    """A non-empty list of mappings (a space's stages), each refusing keys that `allowed` does not name."""
    if not isinstance(value, list) or not value:
        fail(field, f"got {value!r}", "a non-empty list of mappings")
    items = [mapping(item, f"{field}[{i}]") for i, item in enumerate(value)]
    for i, item in enumerate(items):
        check_known(item, allowed, f"{field}[{i}]")
    return items


def with_defaults(value: Any, defaults: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`value` (a mapping or None) over a deep copy of `defaults`, refusing unknown keys."""
    value = {} if value is None else mapping(value, where)
    check_known(value, defaults, where)
    return {**copy.deepcopy(dict(defaults)), **value}


def required(cfg: Mapping[str, Any], key: str, where: str) -> Any:
    """`cfg[key]`; a field that has no default must be written out."""
    if key not in cfg:
        fail(join(where, key), "missing")
    return cfg[key]


def section(cfg: Mapping[str, Any], key: str, defaults: Mapping[str, Any], where: str | None = None) -> dict:
    """`cfg[key]` merged over `defaults`, refusing keys that `defaults` does not name."""
    return with_defaults(cfg.get(key), defaults, where or key)


# ---- scalar fields -----------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def integer(value: Any, field: str, minimum: int | None = None, maximum: int | None = None,
            optional: bool = False, odd: bool = False) -> int | None:
    """An integer in [minimum, maximum]; `odd` for kernel sizes."""
    if value is None and optional:
        return None
    if (not _is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum)
            or (odd and value % 2 == 0)):
        bounds = " and ".join(b for b in (minimum is not None and f">= {minimum}", maximum is not None
                                          and f"<= {maximum}") if b)
        fail(field, f"got {value!r}", f"a{'n odd' if odd else 'n'} integer{' ' + bounds if bounds else ''}"
             + (" or null" if optional else ""))
    return value


def number(value: Any, field: str, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False, optional: bool = False) -> float | None:
    """A finite number in the interval; `low_open`/`high_open` exclude the bound itself."""
    if value is None and optional:
        return None
    ok = _is_number(value) and abs(value) != float("inf")
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        fail(field, f"got {value!r}", f"a number in {interval}" + (" or null" if optional else ""))
    return float(value)


def boolean(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        fail(field, f"got {value!r}", "true or false")
    return value


def string(value: Any, field: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        fail(field, f"got {value!r}", "a non-empty string" + (" or null" if optional else ""))
    return value


def choice(value: Any, field: str, allowed: Iterable[Any]) -> Any:
    allowed = list(allowed)
    if value not in allowed:
        fail(field, f"{value!r} is not allowed", allowed)
    return value


def location(value: Any, field: str, optional: bool = False) -> str | None:
    """A local path or URI (s3://, gs://, file://, ...), normalised by raynas.storage."""
    from raynas import storage

    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        fail(field, f"got {value!r}", "a local path or a URI such as s3://bucket/prefix")
    return storage.normalize(value)


def as_list(value: Any) -> Any:
    """A choice list may be written as its one value (`stride: 2` for `stride: [2]`)."""
    return value if isinstance(value, list) else [value]


def _as_set(values: tuple, field: str, as_set: bool) -> tuple:
    """A set of choices (a space's dim): a repeat is an error (2 and 2.0 count as one), order is sorted."""
    if not as_set:
        return values
    if len(set(values)) != len(values):
        fail(field, f"duplicate choices in {list(values)}", "distinct values")
    return tuple(sorted(values))


def int_choices(value: Any, field: str, minimum: int = 1, odd: bool = False, as_set: bool = False) -> tuple[int, ...]:
    """A non-empty list of integers >= minimum (odd ones only when `odd`, e.g. kernel sizes)."""
    what = f"a non-empty list of {'odd ' if odd else ''}integers >= {minimum}"
    if not isinstance(value, (list, tuple)) or not value:
        fail(field, f"got {value!r}", what)
    for i, item in enumerate(value):
        if not _is_int(item) or item < minimum or (odd and item % 2 == 0):
            fail(f"{field}[{i}]", f"got {item!r}", what)
    return _as_set(tuple(value), field, as_set)


def number_choices(value: Any, field: str, low: float = 0.0, low_open: bool = True, high: float | None = None,
                   as_set: bool = False) -> tuple[float, ...]:
    """A non-empty list of finite numbers above `low` (e.g. expansion ratios). Items keep their YAML type, so
    an arch value written 4 stays 4 (not 4.0) in arch JSON and its hash."""
    if not isinstance(value, (list, tuple)) or not value:
        fail(field, f"got {value!r}", f"a non-empty list of numbers {'>' if low_open else '>='} {low}")
    for i, item in enumerate(value):
        number(item, f"{field}[{i}]", low, high, low_open=low_open)
    return _as_set(tuple(value), field, as_set)


def names(value: Any, field: str, allowed: Iterable[str], sort: bool = False) -> tuple[str, ...]:
    """A non-empty list of distinct names from `allowed`, in the order written, or with `sort` in the order of
    `allowed` (a family's fixed order, whatever order the YAML lists)."""
    allowed = list(allowed)
    if not isinstance(value, (list, tuple)) or not value:
        fail(field, f"got {value!r}", f"a non-empty list of names from {allowed}")
    for i, item in enumerate(value):
        choice(item, f"{field}[{i}]", allowed)
    if len(set(value)) != len(value):
        fail(field, f"duplicate choices in {list(value)}", "distinct values")
    return tuple(a for a in allowed if a in value) if sort else tuple(value)
