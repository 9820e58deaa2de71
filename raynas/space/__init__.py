"""Search-space core. See `SearchSpace` for the protocol every family honours."""

from raynas.space.arch import Arch
from raynas.space.loader import (
    FAMILIES,
    builtin_space_names,
    load_space,
    space_from_config,
)
from raynas.space.space import Dim, SearchSpace, SpaceError

__all__ = [
    "FAMILIES",
    "Arch",
    "Dim",
    "SearchSpace",
    "SpaceError",
    "builtin_space_names",
    "load_space",
    "space_from_config",
]
