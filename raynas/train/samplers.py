"""Subnet samplers: which archs one training step visits. They draw from a numpy Generator the
strategy owns (and checkpoints), seeded alike on every rank so all ranks train the same subnets."""

from __future__ import annotations

import numpy as np

from raynas.space import Arch, SearchSpace


def uniform_arch(space: SearchSpace, rng: np.random.Generator) -> Arch:
    """SPOS: every dimension uniformly at random."""
    return space.sample(rng)


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


def sandwich_archs(space: SearchSpace, rng: np.random.Generator, num_random: int) -> list[Arch]:
    """The sandwich rule: largest, smallest and `num_random` uniform archs (largest first)."""
    return [space.max_arch(), space.min_arch(), *(space.sample(rng) for _ in range(num_random))]
