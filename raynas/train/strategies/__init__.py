"""Training strategies (sampler + loss), selected by name in the config.

Built-in strategies live in modules of this package (or in COMPANION_MODULES) and register
themselves with `@register_strategy`; those modules are imported on first lookup, so a new strategy
is a new file. A config may also name `package.module:ClassName` for a strategy defined elsewhere.
"""

from __future__ import annotations

import importlib
import pkgutil

from raynas.errors import ConfigError
from raynas.train.strategies.base import StepContext, Strategy

STRATEGIES: dict[str, type[Strategy]] = {}
# Strategies that live next to their method's other code in raynas.train (imported if present).
COMPANION_MODULES = ("raynas.train.focusfair", "raynas.train.mole")
_discovered = False


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make `cls` selectable as `strategy: {cls.name}`."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a non-empty `name`")
    existing = STRATEGIES.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise TypeError(f"strategy name '{cls.name}' is taken by {existing.__module__}.{existing.__qualname__}")
    STRATEGIES[cls.name] = cls
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    modules = [f"{__name__}.{info.name}" for info in pkgutil.iter_modules(__path__)
               if info.name != "base" and not info.name.startswith("_")]
    for module in [*modules, *COMPANION_MODULES]:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a companion that is not there is fine; a broken import is not
                raise
    _discovered = True


def strategy_names() -> list[str]:
    _discover()
    return sorted(STRATEGIES)


def get_strategy_class(name: str) -> type[Strategy]:
    """A registered name, or `module.path:ClassName` of a Strategy subclass."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"strategy.name: cannot import {name!r} ({exc})") from None
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise ConfigError(f"strategy.name: {name!r} is not a raynas Strategy subclass")
        return cls
    _discover()
    if name not in STRATEGIES:
        raise ConfigError(f"strategy.name: unknown '{name}'; allowed: {sorted(STRATEGIES)} "
                          "or module.path:ClassName")
    return STRATEGIES[name]


def build_strategy(options: dict, space, seed: int) -> Strategy:
    """A strategy from a validated `strategy:` section ({name: ..., options...})."""
    options = dict(options)
    cls = get_strategy_class(options.pop("name"))
    cls.check_space(space)
    return cls(space, cls.validate_options(options), seed)


__all__ = ["STRATEGIES", "StepContext", "Strategy", "build_strategy", "get_strategy_class",
           "register_strategy", "strategy_names"]
