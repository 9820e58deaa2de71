"""Evolutionary search under constraints (AutoFormer / TAS-LoRA recipe), and the shared
variation step reused by coarse-to-fine (AutoViT Alg. 1) fine search.

Each generation: the top-k feasible parents produce half the children by crossover and half by
mutation, where a mutation first changes each depth with probability `depth_prob` and then each
other decision with probability `gene_prob`. Children violating the constraints are rejected.
"""

from __future__ import annotations

import numpy as np

from raynas.search.algorithms.base import SearchAlgorithm, SearchContext
from raynas.space import Arch, SearchSpace


def is_depth_dim(name: str) -> bool:
    return name.endswith("depth")


def mutate_depth_first(space: SearchSpace, arch: Arch, rng: np.random.Generator, depth_prob: float,
                       gene_prob: float) -> Arch:
    values = dict(arch)
    for d in space.dims:
        p = depth_prob if is_depth_dim(d.name) else gene_prob
        if rng.random() < p:
            values[d.name] = d.choices[rng.integers(d.size)]
    return space.validate(values)


class EvolutionarySearch(SearchAlgorithm):
    name = "evolution"
    PARAMS = ("population", "parents", "gene_prob", "depth_prob", "crossover_fraction")

    def __init__(self, ctx: SearchContext, budget: int, population: int = 50, parents: int = 10,
                 gene_prob: float = 0.2, depth_prob: float = 0.4, crossover_fraction: float = 0.5):
        super().__init__(ctx, budget)
        self.population, self.parents = population, parents
        self.gene_prob, self.depth_prob, self.crossover_fraction = gene_prob, depth_prob, crossover_fraction
        self.rng = ctx.rng(2)
        self.seen: set[Arch] = set()
        self.generation = 0

    def initial_population(self) -> list[Arch]:
        return self._unique(lambda: self.ctx.sample_feasible(self.rng), self.population)

    def _unique(self, make, n: int, max_tries: int = 50) -> list[Arch]:
        out: list[Arch] = []
        for _ in range(n * max_tries):
            if len(out) >= n:
                break
            arch = make()
            if arch is None or arch in self.seen:
                continue
            if not self.ctx.constraints.feasible(self.ctx.estimate(arch)):
                continue
            self.seen.add(arch)
            out.append(arch)
        return out

    def _ask(self) -> list[Arch]:
        if self.generation == 0:
            batch = self.initial_population()
        else:
            top = [Arch.from_json(r["arch"]) for r in self.best_feasible(self.history, self.parents)]
            n_cross = int(round(self.population * self.crossover_fraction))

            def cross() -> Arch:
                i, j = self.rng.choice(len(top), size=2, replace=len(top) < 2)
                return self.ctx.space.crossover(top[i], top[j], self.rng)

            def mutate() -> Arch:
                parent = top[self.rng.integers(len(top))]
                return mutate_depth_first(self.ctx.space, parent, self.rng, self.depth_prob, self.gene_prob)

            batch = self._unique(cross, n_cross) + self._unique(mutate, self.population - n_cross)
            if not batch:  # the neighbourhood is exhausted: keep exploring
                batch = self._unique(lambda: self.ctx.sample_feasible(self.rng), self.population)
        self.generation += 1
        return batch
