"""Training strategies (sampler + loss), selected by name in the config.

Built-in strategies are declared in `STRATEGIES` (a `raynas.registry.Registry`, like the supernet
families and the search algorithms), so a new built-in is a new class and one line there. Strategies
defined elsewhere are plug-ins, found in one of two places the user controls, never in a config file
(a config is data: naming `module:Class` there would let any file import any code):
  * an installed package's entry point in the `raynas.strategies` group
    (`[project.entry-points."raynas.strategies"] mine = "mypkg.strategies:MyStrategy"`);
  * a module named on the command line (`raynas train CFG --plugin mypkg.strategies`), imported by
    the driver and by every worker, which registers its classes with `@register_strategy`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Iterable

from raynas.errors import ConfigError, UserError
from raynas.registry import Registry
from raynas.train.strategies.base import StepContext, Strategy

STRATEGIES = Registry("strategy.name", {
    "uniform": "raynas.train.strategies.uniform:UniformStrategy",
    "fair": "raynas.train.strategies.fair:FairStrategy",
    "sandwich": "raynas.train.strategies.sandwich:SandwichStrategy",
    "focusfair": "raynas.train.focusfair:FocusFairStrategy",
    "mole": "raynas.train.mole:MoLEStrategy",
    "inherit": "raynas.train.inherit:InheritStrategy",
    "biglittle": "raynas.biglittle.train:BigLittleStrategy",
    "single-arch": "raynas.biglittle.train:SingleArchStrategy",
})
ENTRY_POINT_GROUP = "raynas.strategies"


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator for plug-ins: make `cls` selectable as `strategy: {cls.name}`."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a non-empty `name`")
    STRATEGIES.add(cls.name, cls)
    return cls


def strategy_names() -> list[str]:
    return STRATEGIES.names()


def load_plugins(modules: Iterable[str]) -> None:
    """Import the strategy modules named on the command line (`--plugin`); each registers its strategies
    with `@register_strategy`. The driver and every Ray Train worker call this with the same list."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UserError(f"--plugin: cannot import module {module!r} ({exc}); allowed: an importable "
                            "module that registers strategies with @register_strategy") from None


def _entry_point_names() -> list[str]:
    return sorted({ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)})


def _from_entry_point(name: str) -> type[Strategy] | None:
    """The strategy an installed package declares under `name` in the entry-point group, if any."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plug-in package: name it instead of a traceback
            raise ConfigError(f"strategy.name: entry point '{name}' ({ep.value}) of group {ENTRY_POINT_GROUP} "
                              f"failed to load ({type(exc).__name__}: {str(exc).partition(chr(10))[0]})") from None
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise ConfigError(f"strategy.name: entry point '{name}' ({ep.value}) is not a raynas Strategy subclass")
        STRATEGIES.add(name, cls)
        return cls
    return None


def _allowed() -> str:
    return (f"allowed: {sorted({*STRATEGIES.names(), *_entry_point_names()})}, or a strategy from a module given with "
            f"--plugin MODULE or from an installed package's '{ENTRY_POINT_GROUP}' entry point")


def get_strategy_class(name: str) -> type[Strategy]:
    """A registered name (built-in, `--plugin` module, or `raynas.strategies` entry point)."""
    if ":" in name:
        raise ConfigError(f"strategy.name: {name!r} names code to import, which a config file may not do; "
                          + _allowed())
    cls = STRATEGIES.find(name) or _from_entry_point(name)
    if cls is None:
        raise ConfigError(f"strategy.name: unknown '{name}'; " + _allowed())
    return cls


def check_strategy(options: dict, space) -> None:
    """Everything about a validated `strategy:` section that depends on the space (the driver, before compute)."""
    options = dict(options)
    cls = get_strategy_class(options.pop("name"))
    cls.check_fit(cls.validate_options(options), space)


def build_strategy(options: dict, space, seed: int) -> Strategy:
    """A strategy from a validated `strategy:` section ({name: ..., options...})."""
    options = dict(options)
    cls = get_strategy_class(options.pop("name"))
    options = cls.validate_options(options)
    cls.check_fit(options, space)
    return cls(space, options, seed)


__all__ = ["ENTRY_POINT_GROUP", "STRATEGIES", "StepContext", "Strategy", "build_strategy", "check_strategy",
           "get_strategy_class", "load_plugins", "register_strategy", "strategy_names"]
