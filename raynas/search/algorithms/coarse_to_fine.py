"""Coarse-to-fine latency-aware search (AutoViT, seed 001 Alg. 1).

Coarse: sample many subnets, keep those within the latency and parameter budgets using only the
latency model (no accuracy evaluation), and take the top-K skeletons — the ones using most of the
budget, since within a budget the larger subnet is the more promising one. Fine: evolutionary
search seeded with those skeletons; mutation changes depth with P_d, then each block with P_m.
"""

from __future__ import annotations

from raynas.search.algorithms.base import SearchContext
from raynas.search.algorithms.evolution import EvolutionarySearch
from raynas.space import Arch


class CoarseToFineSearch(EvolutionarySearch):
    name = "coarse-to-fine"
    PARAMS = ("coarse_samples", "population", "parents", "depth_prob", "block_prob")

    def __init__(self, ctx: SearchContext, budget: int, coarse_samples: int = 2000, population: int = 50,
                 parents: int = 10, depth_prob: float = 0.2, block_prob: float = 0.4):
        super().__init__(ctx, budget, population=population, parents=parents, gene_prob=block_prob,
                         depth_prob=depth_prob)
        self.coarse_samples = coarse_samples

    def initial_population(self) -> list[Arch]:
        candidates: dict[Arch, tuple[float, float]] = {}
        for _ in range(self.coarse_samples):
            arch = self.ctx.space.sample(self.rng)
            est = self.ctx.estimate(arch)
            if self.ctx.constraints.feasible(est):
                candidates[arch] = (float(est["latency_ms"]), float(est["params"]))
        ranked = sorted(candidates, key=lambda a: candidates[a], reverse=True)[: self.population]
        self.seen.update(ranked)
        return ranked
