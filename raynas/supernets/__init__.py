"""Supernet families, all honouring `raynas.supernets.base.Supernet`."""

from __future__ import annotations

from typing import Any

from raynas.space import SearchSpace, load_space
from raynas.space.loader import family_module
from raynas.supernets.base import Block, Subnet, Supernet


def build_supernet(space: SearchSpace | str, **kwargs: Any) -> Supernet:
    """The supernet of a space (object, built-in name or YAML path)."""
    if not isinstance(space, SearchSpace):
        space = load_space(space)
    return family_module(space.family).build_supernet(space, **kwargs)


__all__ = ["Block", "Subnet", "Supernet", "build_supernet"]
