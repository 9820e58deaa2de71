"""Random search: the baseline every other algorithm must beat at equal budget."""

from __future__ import annotations

from raynas.search.algorithms.base import SearchAlgorithm, SearchContext
from raynas.space import Arch


class RandomSearch(SearchAlgorithm):
    name = "random"
    PARAMS = ("batch_size",)

    def __init__(self, ctx: SearchContext, budget: int, batch_size: int = 50):
        super().__init__(ctx, budget)
        self.batch_size = batch_size
        self.rng = ctx.rng(1)
        self.seen: set[Arch] = set()

    def _ask(self) -> list[Arch]:
        batch = []
        for _ in range(self.batch_size * 20):
            if len(batch) >= min(self.batch_size, self.remaining):
                break
            arch = self.ctx.sample_feasible(self.rng)
            if arch is not None and arch not in self.seen:
                self.seen.add(arch)
                batch.append(arch)
        return batch
