"""Supernet families, all honouring `raynas.supernets.base.Supernet`."""

from __future__ import annotations

from typing import Any

from torch import nn

from raynas.space import SearchSpace, load_space
from raynas.space.loader import family_module
from raynas.supernets.base import Block, BuildOption, Subnet, Supernet


def build_supernet(space: SearchSpace | str, **kwargs: Any) -> Supernet:
    """The supernet of a space (object, built-in name or YAML path).

    Cross-family options (each a `BuildOption` part, see `supernet_kwargs`): `hypernet={...}` generates
    the conv weights with a Kshot-Hypernet (topology spaces), `mole={...}` adds TAS-LoRA experts and
    router (autoformer). The rest go to the family's builder.
    """
    if not isinstance(space, SearchSpace):
        space = load_space(space)
    hypernet, mole = kwargs.pop("hypernet", None), kwargs.pop("mole", None)
    supernet = family_module(space.family).build_supernet(space, **kwargs)
    if hypernet not in (None, False):
        from raynas.nn.hyper import validate_hypernet_config
        from raynas.supernets.hypernet import attach_hypernet

        attach_hypernet(supernet, validate_hypernet_config(hypernet))
    if mole is not None:
        from raynas.supernets.mole import attach_mole

        supernet = attach_mole(supernet, mole)
    return supernet


def supernet_kwargs(model: nn.Module) -> dict[str, Any]:
    """The cross-family `build_supernet` options that rebuild `model` (stored in checkpoints)."""
    options: dict[str, Any] = {}
    for part in model.modules():
        if isinstance(part, BuildOption):
            options.update(part.build_option())
    return options


__all__ = ["Block", "Subnet", "Supernet", "build_supernet", "supernet_kwargs"]
