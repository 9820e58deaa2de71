"""Weight inheritance (seed 001, AutoViT §3.2 and §5.2): start a supernet from a larger trained one.

Every tensor of the smaller supernet receives the overlapping slice of the trained larger one (the
family's `inherit_weights`, e.g. `raynas.supernets.autovit.inherit_weights`). The `inherit` strategy
does this in every worker, then hands everything else to the stage's own strategy; size-specific
chains (`raynas.train.chain`) select it for every stage that inherits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from raynas import storage
from raynas.errors import ConfigError
from raynas.space import SearchSpace
from raynas.space.loader import family_module
from raynas.train.strategies import build_strategy, get_strategy_class
from raynas.train.strategies.base import Strategy

INHERIT_STRATEGY = "inherit"


# ---- inheritance of weights ------------------------------------------------------------------------
def inherit_function(family: str, where: str = "inherit_from"):
    fn = getattr(family_module(family), "inherit_weights", None)
    if fn is None:
        raise ConfigError(f"{where}: family '{family}' has no weight inheritance (inherit_weights); "
                          f"allowed: families that define it, e.g. autovit")
    return fn


def inherit_from_checkpoint(dst, path: str | os.PathLike, where: str = "strategy.init_from") -> dict[str, Any]:
    """Copy the overlapping weights of a saved supernet (`raynas train` output; a local path or URI) into `dst`."""
    from raynas.supernets.checkpoint import load_supernet

    if not storage.is_file(path):
        raise ConfigError(f"{where}: file {storage.display(path)} does not exist")
    src = load_supernet(path)
    if src.space.family != dst.space.family:
        raise ConfigError(f"{where}: {storage.display(path)} is a '{src.space.family}' supernet; '{dst.space.name}' is "
                          f"'{dst.space.family}'")
    return inherit_function(dst.space.family, where)(src, dst)


def _normalise_base(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        value = "uniform"
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping) or not isinstance(value.get("name"), str):
        raise ConfigError(f"{where}: expected a strategy name or a mapping with 'name', got {value!r}")
    cls = get_strategy_class(value["name"])
    if cls.LOADS_WEIGHTS:
        raise ConfigError(f"{where}.name: '{value['name']}' cannot follow inheritance (it loads its own weights)")
    options = cls.validate_options({k: v for k, v in value.items() if k != "name"}, where=where)
    return {"name": value["name"], **options}


class InheritStrategy(Strategy):
    """Initialise the supernet from a larger trained one, then train with the `base` strategy.

    Selected as `strategy: {name: inherit, init_from: LOCATION, base: ...}` (a local path or URI);
    `train_size_specific` writes this for every inheriting stage. On resume the run's checkpoint
    replaces the inherited weights, as it should.
    """

    name = INHERIT_STRATEGY
    DEFAULTS = {"init_from": None, "base": None}
    LOADS_WEIGHTS = True

    @classmethod
    def check(cls, options: dict[str, Any], where: str) -> None:
        if not isinstance(options["init_from"], str) or not options["init_from"]:
            raise ConfigError(f"{where}.init_from: expected the path of the larger trained supernet, "
                              f"got {options['init_from']!r}")
        # Absolute (or a URI): every worker reads it, whatever its working directory.
        options["init_from"] = storage.normalize(options["init_from"])
        options["base"] = _normalise_base(options["base"], f"{where}.base")

    @classmethod
    def check_space(cls, space: SearchSpace) -> None:
        inherit_function(space.family, "strategy")

    def __init__(self, space: SearchSpace, options: Mapping[str, Any], seed: int):
        super().__init__(space, options, seed)
        self.inner = build_strategy(self.options["base"], space, seed)
        self.name = f"{self.inner.name}+inherit"  # what metrics and checkpoint metadata record
        self.inherit_report: dict[str, Any] | None = None

    def prepare_model(self, supernet):
        self.inherit_report = inherit_from_checkpoint(supernet, self.options["init_from"])
        return self.inner.prepare_model(supernet)

    def configure_optimizers(self, model, make_optimizer):
        return self.inner.configure_optimizers(model, make_optimizer)

    def export_supernet(self, model):
        return self.inner.export_supernet(model)

    def teacher_arch(self):
        return self.inner.teacher_arch()

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        self.inner.on_epoch_start(epoch, num_epochs)

    def train_step(self, x, y, ctx):
        return self.inner.train_step(x, y, ctx)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)


__all__ = ["INHERIT_STRATEGY", "InheritStrategy", "inherit_from_checkpoint", "inherit_function"]
