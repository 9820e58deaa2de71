"""Hardware-aware evolutionary search with search-space evolution (SCAN-Edge, seed 004 §3).

* Candidates come from per-decision sampling probabilities p (uniform at first) and from mutation
  and crossover of the best evaluated subnets; only candidates meeting the latency/size constraints
  (calibrated LUT) are kept.
* The accuracy predictor χ screens many candidates; only the `population` best predicted ones are
  evaluated on the supernet. χ is refitted on every evaluation so far.
* Search-space evolution: when the quality Q = mean χ(top-k) improves by more than δ, p moves toward
  the choice frequencies p* of the top-k: p <- λ p + (1 - λ) p*.
"""

from __future__ import annotations

import numpy as np

from raynas.search.algorithms.base import Record, SearchAlgorithm, SearchContext
from raynas.search.algorithms.evolution import mutate_depth_first
from raynas.search.predictor import AccuracyPredictor
from raynas.space import Arch


class ScanEdgeSearch(SearchAlgorithm):
    name = "scanedge"
    PARAMS = ("population", "parents", "gene_prob", "top_k", "momentum", "delta", "predictor_min_samples",
              "predictor_candidates")

    def __init__(self, ctx: SearchContext, budget: int, population: int = 50, parents: int = 10,
                 gene_prob: float = 0.2, top_k: int = 10, momentum: float = 0.8, delta: float = 0.0,
                 predictor_min_samples: int | None = None, predictor_candidates: int = 1000):
        super().__init__(ctx, budget)
        self.population, self.parents, self.gene_prob = population, parents, gene_prob
        self.top_k, self.momentum, self.delta = top_k, momentum, delta
        self.predictor_min_samples = predictor_min_samples or population
        self.predictor_candidates = predictor_candidates
        self.probs = [np.full(d.size, 1.0 / d.size) for d in ctx.space.dims]
        self.quality = -np.inf
        self.predictor: AccuracyPredictor | None = None
        self.rng = ctx.rng(4)
        self.seen: set[Arch] = set()

    def sample_from_probs(self) -> Arch:
        space = self.ctx.space
        return space.validate({d.name: d.choices[self.rng.choice(d.size, p=p)] for d, p in zip(space.dims, self.probs)})

    def _feasible_unseen(self, arch: Arch) -> bool:
        return arch not in self.seen and self.ctx.constraints.feasible(self.ctx.estimate(arch))

    def _candidates(self, n: int) -> list[Arch]:
        space = self.ctx.space
        top = [Arch.from_json(r["arch"]) for r in self.best_feasible(self.history, self.parents)]
        out: dict[Arch, None] = {}
        for i in range(n * 5):
            if len(out) >= n:
                break
            kind = i % 3
            if kind == 0 or not top:
                arch = self.sample_from_probs()
            elif kind == 1:
                arch = mutate_depth_first(space, top[self.rng.integers(len(top))], self.rng, self.gene_prob,
                                          self.gene_prob)
            else:
                a, b = self.rng.choice(len(top), size=2, replace=len(top) < 2)
                arch = space.crossover(top[a], top[b], self.rng)
            if self._feasible_unseen(arch):
                out[arch] = None
        return list(out)

    def _ask(self) -> list[Arch]:
        want = min(self.population, self.remaining)
        if len(self.history) < self.predictor_min_samples:
            batch = self._candidates(want)
        else:
            candidates = self._candidates(self.predictor_candidates)
            scores = self.predictor.predict(candidates) if candidates else np.array([])
            batch = [candidates[i] for i in np.argsort(-scores)[:want]]
        self.seen.update(batch)
        return batch

    def _tell(self, archs: list[Arch], records: list[Record]) -> None:
        history = self.history
        self.predictor = AccuracyPredictor(self.ctx.space, seed=self.ctx.seed).fit(
            [Arch.from_json(r["arch"]) for r in history], [r["accuracy"] for r in history])
        top = [Arch.from_json(r["arch"]) for r in self.best_feasible(history, self.top_k)]
        if not top:
            return
        quality = float(np.mean(self.predictor.predict(top)))
        if quality - self.quality > self.delta:
            self._evolve_space(top)
            self.quality = quality

    def _evolve_space(self, top: list[Arch]) -> None:
        for j, d in enumerate(self.ctx.space.dims):
            freq = np.bincount([d.index(a[d.name]) for a in top], minlength=d.size) / len(top)
            self.probs[j] = self.momentum * self.probs[j] + (1 - self.momentum) * freq
