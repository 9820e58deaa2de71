"""Search-space core: dimensions, sampling, variation operators, integer encoding, validation."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raynas.errors import UserError
from raynas.space.arch import Arch
from raynas.space.summary import compact


class SpaceError(UserError, ValueError):
    """An arch (or a space declaration) is not valid; the message names the offending field."""


@dataclass(frozen=True)
class Dim:
    """One searchable decision: a name and its ordered tuple of allowed values.

    Numeric choices are kept sorted ascending so that index order is size order (small -> large),
    which the sandwich rule and integer encodings rely on.
    """

    name: str
    choices: tuple

    def __post_init__(self):
        if not self.choices:
            raise SpaceError(f"dimension '{self.name}': needs at least one choice")
        if len(set(self.choices)) != len(self.choices):
            raise SpaceError(f"dimension '{self.name}': duplicate choices {list(self.choices)}")

    def index(self, value: Any) -> int:
        try:
            return self.choices.index(value)
        except ValueError:
            raise SpaceError(
                f"arch field '{self.name}': {value!r} is not allowed; allowed: {list(self.choices)}"
            ) from None

    @property
    def size(self) -> int:
        return len(self.choices)


def _coerce(dim: Dim, value: Any) -> Any:
    """Accept JSON spellings of a choice (e.g. 3.0 for 3, 4 for 4.0) but nothing else."""
    if value in dim.choices and not isinstance(value, bool):
        for c in dim.choices:
            if c == value and type(c) is type(value):
                return c
        for c in dim.choices:
            if c == value and isinstance(c, (int, float)) and not isinstance(c, bool):
                return c
    if isinstance(value, bool):
        if value in dim.choices and any(isinstance(c, bool) for c in dim.choices):
            return value
    dim.index(value)  # raises a field-named error
    return value


@dataclass
class SearchSpace:
    """A named set of dimensions. Families subclass it to add structure.

    Hooks for families:
      * `canonicalize(values)` maps every equivalent arch to one representative (e.g. the
        settings of blocks beyond the sampled depth are reset), so equal networks hash equal.
      * `min_arch()` / `max_arch()` give the smallest and largest subnet (sandwich rule).
      * `log10_cardinality()` counts distinct networks (after canonicalisation).
      * `arch_summary(arch)` renders an arch in one short line for reports (raynas.space.summary).

    `references`: the well-known models the space holds (name -> `Reference`), declared under
    `references:` in its YAML and checked against it when it loads (raynas.space.references).
    """

    name: str
    family: str
    dims: tuple[Dim, ...]
    resolution: int = 224
    num_classes: int = 1000
    in_channels: int = 3
    config: dict = field(default_factory=dict)
    references: dict = field(default_factory=dict)

    def __post_init__(self):
        names = [d.name for d in self.dims]
        if len(set(names)) != len(names):
            raise SpaceError(f"space '{self.name}': duplicate dimension names")
        self._by_name = {d.name: d for d in self.dims}

    # ---- structure ---------------------------------------------------------------------------
    @property
    def dim_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dims)

    def dim(self, name: str) -> Dim:
        return self._by_name[name]

    def canonicalize(self, values: dict[str, Any]) -> dict[str, Any]:
        return values

    def log10_cardinality(self) -> float:
        return float(sum(math.log10(d.size) for d in self.dims))

    def _make(self, values: Mapping[str, Any]) -> Arch:
        ordered = {d.name: values[d.name] for d in self.dims}
        return Arch(self.canonicalize(ordered))

    def min_arch(self) -> Arch:
        return self._make({d.name: d.choices[0] for d in self.dims})

    def max_arch(self) -> Arch:
        return self._make({d.name: d.choices[-1] for d in self.dims})

    # ---- validation --------------------------------------------------------------------------
    def validate(self, arch: Mapping[str, Any]) -> Arch:
        """Return the canonical `Arch` for a user-given mapping or raise `SpaceError`."""
        if not isinstance(arch, Mapping):
            raise SpaceError(f"arch: expected a JSON object with fields of space '{self.name}'")
        unknown = [k for k in arch if k not in self._by_name]
        if unknown:
            raise SpaceError(
                f"arch field '{unknown[0]}': unknown in space '{self.name}'; "
                f"allowed fields: {list(self.dim_names)}"
            )
        missing = [d.name for d in self.dims if d.name not in arch]
        if missing:
            raise SpaceError(f"arch field '{missing[0]}': missing (space '{self.name}' needs all of its fields)")
        values = {d.name: _coerce(d, arch[d.name]) for d in self.dims}
        return self._make(values)

    # ---- sampling and variation --------------------------------------------------------------
    def sample(self, rng: np.random.Generator) -> Arch:
        return self._make({d.name: d.choices[rng.integers(d.size)] for d in self.dims})

    def mutate(self, arch: Arch, rng: np.random.Generator, p: float = 0.2) -> Arch:
        values = dict(arch)
        for d in self.dims:
            if rng.random() < p:
                values[d.name] = d.choices[rng.integers(d.size)]
        return self._make(values)

    def crossover(self, a: Arch, b: Arch, rng: np.random.Generator) -> Arch:
        """Uniform crossover: each field from either parent with equal probability."""
        return self._make({d.name: (a[d.name] if rng.random() < 0.5 else b[d.name]) for d in self.dims})

    # ---- integer encoding (pymoo) ------------------------------------------------------------
    def encode(self, arch: Arch) -> np.ndarray:
        return np.array([d.index(arch[d.name]) for d in self.dims], dtype=np.int64)

    def decode(self, x: Sequence[int] | np.ndarray) -> Arch:
        x = np.asarray(x)
        if x.shape != (len(self.dims),):
            raise SpaceError(f"encoding: expected {len(self.dims)} integers, got shape {tuple(x.shape)}")
        values = {}
        for d, i in zip(self.dims, x):
            i = int(round(float(i)))
            if not 0 <= i < d.size:
                raise SpaceError(f"encoding of '{d.name}': index {i} outside 0..{d.size - 1}")
            values[d.name] = d.choices[i]
        return self._make(values)

    @property
    def upper_bounds(self) -> np.ndarray:
        return np.array([d.size - 1 for d in self.dims], dtype=np.int64)

    def arch_summary(self, arch: Mapping[str, Any]) -> str:
        """`arch` in one short line (report tables); families override it with their stage layout."""
        return compact(arch)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "num_dims": len(self.dims),
            "log10_cardinality": round(self.log10_cardinality(), 4),
            "resolution": self.resolution,
            "num_classes": self.num_classes,
        }
