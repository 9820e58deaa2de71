"""Subnet samplers: which archs one training step visits. They draw from a numpy Generator the
strategy owns (and checkpoints), seeded alike on every rank so all ranks train the same subnets.

Progressive shrinking (OFA, Cai et al. 2020) restricts them: in each phase the dims not yet released
are held at their largest choice (`held`). Held dims are fixed on the raw draw, before the space
canonicalises it, so that e.g. a kernel drawn for a block beyond a sampled depth is not lost when depth
is held at its maximum; the draw consumes the generator exactly as the unrestricted sampler does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import numpy as np

from raynas import config as c
from raynas.space import Arch, SearchSpace

NO_DIMS: frozenset[str] = frozenset()


def hold(space: SearchSpace, values: Mapping[str, Any], held: Iterable[str]) -> Arch:
    """The canonical arch of raw `values` with the `held` dims at their largest choice."""
    return space.validate({**values, **{name: space.dim(name).choices[-1] for name in held}})


def uniform_arch(space: SearchSpace, rng: np.random.Generator, held: frozenset[str] = NO_DIMS) -> Arch:
    """SPOS: every dimension uniformly at random (the `held` ones at their largest choice)."""
    if not held:
        return space.sample(rng)
    return hold(space, {d.name: d.choices[rng.integers(d.size)] for d in space.dims}, held)


def smallest_arch(space: SearchSpace, held: frozenset[str] = NO_DIMS) -> Arch:
    """The smallest arch (the `held` dims at their largest choice)."""
    if not held:
        return space.min_arch()
    return hold(space, {d.name: d.choices[0] for d in space.dims}, held)


def fair_paths(space: SearchSpace, rng: np.random.Generator, num_paths: int | None = None) -> list[Arch]:
    """FairNAS strict fairness: `num_paths` archs in which every choice of every dimension appears.

    Each dimension's column is a concatenation of fresh random permutations of its choices, cut to
    `num_paths` (default: the largest number of choices of any dimension), so a dimension with k
    choices shows each of them floor(m/k) or ceil(m/k) times: all choices once when m == k, as in
    FairNAS, and as evenly as possible when dimensions differ in size (width, depth, kernel ...).
    Canonicalisation may still reset choices an arch cannot use (e.g. blocks beyond its depth).
    """
    m = num_paths or max(d.size for d in space.dims)
    columns = {}
    for d in space.dims:
        reps = -(-m // d.size)
        order = np.concatenate([rng.permutation(d.size) for _ in range(reps)])[:m]
        columns[d.name] = [d.choices[i] for i in order]
    return [space.validate({name: col[i] for name, col in columns.items()}) for i in range(m)]


def sandwich_archs(space: SearchSpace, rng: np.random.Generator, num_random: int,
                   held: frozenset[str] = NO_DIMS) -> list[Arch]:
    """The sandwich rule: largest, smallest and `num_random` uniform archs (largest first)."""
    return [space.max_arch(), smallest_arch(space, held), *(uniform_arch(space, rng, held) for _ in range(num_random))]


# ---- progressive shrinking ------------------------------------------------------------------------
FULL = "full"  # a phase that releases nothing: the largest network alone (OFA's first phase)


def validate_progressive(value: Any, where: str) -> dict[str, list] | None:
    """The shape of a `progressive: {phases: [...], epochs: [...]}` option (None: off); the group names are
    checked against the space (`ProgressiveSchedule.of`), the epochs against the run (`check_epochs`)."""
    if value is None:
        return None
    value = c.mapping(value, where)
    c.check_known(value, ("phases", "epochs"), where)
    phases, epochs = c.required(value, "phases", where), c.required(value, "epochs", where)
    if not isinstance(phases, list) or not phases or not all(isinstance(p, str) for p in phases):
        c.fail(c.join(where, "phases"), f"got {phases!r}",
               f"a list of group names, e.g. [{FULL}, kernel, depth, width]")
    if len(set(phases)) != len(phases):
        c.fail(c.join(where, "phases"), f"{phases} names a phase twice", "each group once")
    if FULL in phases[1:]:
        c.fail(c.join(where, "phases"), f"'{FULL}' comes after other phases", f"'{FULL}' first or not at all")
    if not isinstance(epochs, list) or len(epochs) != len(phases):
        c.fail(c.join(where, "epochs"), f"got {epochs!r}", f"one epoch count per phase ({len(phases)})")
    for i, e in enumerate(epochs):
        c.integer(e, f"{c.join(where, 'epochs')}[{i}]", 1)
    return {"phases": list(phases), "epochs": list(epochs)}


def check_progressive_epochs(option: dict[str, list] | None, epochs: int, where: str) -> None:
    if option is not None and sum(option["epochs"]) != epochs:
        c.fail(c.join(where, "epochs"), f"the phases last {sum(option['epochs'])} epochs, the run {epochs}",
               f"epoch counts summing to the run's epochs ({epochs})")


@dataclass(frozen=True)
class ProgressiveSchedule:
    """OFA's progressive shrinking as a function of the epoch alone, so a resumed run continues in the
    phase its epoch belongs to. Phase i releases the groups of phases 0..i; the others stay held."""

    phases: tuple[str, ...]
    ends: tuple[int, ...]                     # first epoch after each phase
    groups: Mapping[str, tuple[str, ...]]     # group -> its dims (the family's declaration)

    @classmethod
    def of(cls, space: SearchSpace, option: Mapping[str, list], where: str) -> ProgressiveSchedule:
        """The schedule of a validated option on `space`, or the one-line error naming `where`."""
        from raynas.supernets.base import ProgressiveShrinking, families_implementing

        if not isinstance(space, ProgressiveShrinking):
            c.fail(where, f"space '{space.name}' (family '{space.family}') declares no progressive-shrinking "
                   "groups", f"families {families_implementing(ProgressiveShrinking)}")
        groups = space.progressive_groups()
        named = [p for p in option["phases"] if p != FULL]
        if sorted(named) != sorted(groups):
            c.fail(c.join(where, "phases"), f"got {option['phases']}",
                   f"each of {list(groups)} once, after an optional '{FULL}' (family '{space.family}')")
        return cls(tuple(option["phases"]), tuple(accumulate(option["epochs"])), dict(groups))

    def phase(self, epoch: int) -> int:
        """Index of the phase `epoch` (0-based) belongs to; epochs past the schedule stay in the last."""
        return next((i for i, end in enumerate(self.ends) if epoch < end), len(self.ends) - 1)

    def held(self, epoch: int) -> frozenset[str]:
        """The dims still at their largest choice in `epoch`."""
        released = set(self.phases[: self.phase(epoch) + 1])
        return frozenset(d for group, dims in self.groups.items() if group not in released for d in dims)
