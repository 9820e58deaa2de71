"""The pair space: one point is a (big, little[, split]) pair of subnets of one `mbv3` space.

Its dims are `big.<dim>` and `little.<dim>` for every dim of the base space, plus `split` for the
`partial` coupling, so the ordinary search machinery (sampling, mutation, crossover, integer encoding,
NSGA-II, the result store) works on pairs unchanged. `canonicalize` encodes what each coupling of
seed 002 §3.2 means, so that equal pairs (same deployed computation) hash equal:

  * `nested`  (option A): little is a sub-network of big. Every dim of the pair is ordered so that
    little <= big (fewer/narrower/smaller choices are a prefix or centre crop of the larger ones:
    weight entanglement makes little a strict subset of big).
  * `sibling` (option B): big and little are separate networks that share only the stem. The stem
    runs once, so both use big's resolution; little may be narrower (it reads the first channels of
    the shared stem output), never wider.
  * `partial` (option C): shared stem and the first `split` block slots (in `Supernet.slots` order);
    little branches off after them. Little's settings for the shared slots are big's.
    `sibling` is `partial` with split 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from raynas.errors import ConfigError
from raynas.space import Arch, Dim, SearchSpace, SpaceError

COUPLINGS = ("nested", "sibling", "partial")
BIG, LITTLE, SPLIT = "big.", "little.", "split"


def slot_dims(base: SearchSpace) -> list[tuple[str, str, str]]:
    """(depth dim, kernel dim, expand dim) of every block slot of an `mbv3` space, in slot order."""
    out = []
    for s, stage in enumerate(base.structure.stages):
        for j in range(max(stage.depths)):
            out.append((f"stage{s + 1}.depth", f"stage{s + 1}.b{j}.kernel", f"stage{s + 1}.b{j}.expand"))
    return out


def default_splits(base: SearchSpace) -> tuple[int, ...]:
    """Stage boundaries (after stage 1, 2, ... of the largest network), the natural branch points."""
    bounds, total = [], 0
    for stage in base.structure.stages[:-1]:
        total += max(stage.depths)
        bounds.append(total)
    return tuple(bounds)


@dataclass
class PairSpace(SearchSpace):
    """Pairs of `base` subnets under one coupling (see the module docstring)."""

    base: SearchSpace | None = None
    coupling: str = "nested"
    splits: tuple[int, ...] = (0,)

    def __post_init__(self):
        super().__post_init__()
        self._slots = slot_dims(self.base)

    # ---- views -------------------------------------------------------------------------------
    def big(self, pair: Mapping[str, Any]) -> Arch:
        return self.base.validate({d.name: pair[BIG + d.name] for d in self.base.dims})

    def little(self, pair: Mapping[str, Any]) -> Arch:
        return self.base.validate({d.name: pair[LITTLE + d.name] for d in self.base.dims})

    def split(self, pair: Mapping[str, Any]) -> int:
        """Number of leading block slots the pair shares (0: the stem only; nested: no sharing)."""
        if self.coupling == "partial":
            return int(pair[SPLIT])
        return 0

    def make(self, big: Mapping[str, Any], little: Mapping[str, Any], split: int | None = None) -> Arch:
        """The canonical pair of two base archs (and a split for `partial`)."""
        values = {BIG + k: v for k, v in self.base.validate(big).items()}
        values.update({LITTLE + k: v for k, v in self.base.validate(little).items()})
        if self.coupling == "partial":
            values[SPLIT] = self.splits[0] if split is None else split
        return self.validate(values)

    def extreme_pair(self, rng: np.random.Generator | None = None) -> Arch:
        """The sandwich pair: largest big with smallest little (a random split for `partial`)."""
        split = None
        if self.coupling == "partial" and rng is not None:
            split = self.splits[rng.integers(len(self.splits))]
        return self.make(self.base.max_arch(), self.base.min_arch(), split)

    # ---- canonical form ------------------------------------------------------------------------
    def canonicalize(self, values: dict[str, Any]) -> dict[str, Any]:
        names = [d.name for d in self.base.dims]
        big = self.base.canonicalize({n: values[BIG + n] for n in names})
        little = self.base.canonicalize({n: values[LITTLE + n] for n in names})
        if self.coupling == "nested":
            for n in names:
                dim = self.base.dim(n)
                lo, hi = sorted((little[n], big[n]), key=dim.index)
                little[n], big[n] = lo, hi
        else:
            width = self.base.dim("width")
            little["width"], big["width"] = sorted((little["width"], big["width"]), key=width.index)
            little["resolution"] = big["resolution"]  # one stem, one input size
            split = int(values.get(SPLIT, 0))
            for i, (depth, kernel, expand) in enumerate(self._slots[:split]):
                little[kernel], little[expand] = big[kernel], big[expand]
                last_of_stage = i + 1 == len(self._slots) or self._slots[i + 1][0] != depth
                if last_of_stage:  # a stage wholly inside the shared trunk has big's depth
                    little[depth] = big[depth]
        big, little = self.base.canonicalize(big), self.base.canonicalize(little)
        out = {BIG + n: big[n] for n in names}
        out.update({LITTLE + n: little[n] for n in names})
        if self.coupling == "partial":
            out[SPLIT] = values[SPLIT]
        return out

    def log10_cardinality(self) -> float:
        """Upper bound: distinct (big, little) combinations of the base space (and splits), before the
        coupling's ordering and sharing merge equivalent pairs."""
        return 2 * self.base.log10_cardinality() + float(np.log10(len(self.splits)))

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "coupling": self.coupling, "splits": list(self.splits)}


def build_pair_space(base: SearchSpace, coupling: str = "nested", splits: Sequence[int] | None = None) -> PairSpace:
    """The pair space of an `mbv3` base space under `coupling`; `splits` are the searched split points."""
    if coupling not in COUPLINGS:
        raise ConfigError(f"coupling: {coupling!r} is not allowed; allowed: {list(COUPLINGS)}")
    if base.family != "mbv3" or getattr(base, "structure", None) is None:
        raise SpaceError(f"space {base.name}: big/little couplings need an 'mbv3' family space, "
                         f"not family '{base.family}'")
    num_slots = len(slot_dims(base))
    if coupling == "partial":
        splits = tuple(default_splits(base) if splits is None else splits)
        bad = [s for s in splits if not (isinstance(s, int) and not isinstance(s, bool) and 1 <= s < num_slots)]
        if not splits or bad or len(set(splits)) != len(splits):
            raise ConfigError(f"splits: expected distinct block-slot indices in 1..{num_slots - 1} "
                              f"(shared slots before the branch), got {list(splits)}")
        splits = tuple(sorted(splits))
    else:
        if splits not in (None, [], (), [0], (0,)):
            raise ConfigError(f"splits: only the 'partial' coupling has a split point; "
                              f"coupling '{coupling}' got {list(splits)}")
        splits = (0,)
    dims = [Dim(BIG + d.name, d.choices) for d in base.dims] + [Dim(LITTLE + d.name, d.choices) for d in base.dims]
    if coupling == "partial":
        dims.append(Dim(SPLIT, splits))
    return PairSpace(name=f"{base.name}/{coupling}", family="biglittle", dims=tuple(dims),
                     resolution=base.resolution, num_classes=base.num_classes, in_channels=base.in_channels,
                     config={"base": dict(base.config), "coupling": coupling, "splits": list(splits)},
                     base=base, coupling=coupling, splits=splits)


def is_pair(arch: Mapping[str, Any] | None) -> bool:
    return arch is not None and (BIG + "width") in arch
