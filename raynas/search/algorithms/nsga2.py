"""NSGA-II (pymoo, ask/tell) over the space's integer encoding.

Objectives are minimised (accuracy negated); constraints are the relative violations of
`Constraints`, so pymoo's constraint domination keeps the front feasible.
"""

from __future__ import annotations

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.evaluator import Evaluator
from pymoo.core.problem import Problem
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair
from pymoo.problems.static import StaticProblem

from raynas.search.algorithms.base import Record, SearchAlgorithm, SearchContext
from raynas.space import Arch


class NSGA2Search(SearchAlgorithm):
    name = "nsga2"
    PARAMS = ("population", "crossover_prob", "crossover_eta", "mutation_eta", "seed_extremes")

    def __init__(self, ctx: SearchContext, budget: int, population: int = 50, crossover_prob: float = 0.9,
                 crossover_eta: float = 15.0, mutation_eta: float = 20.0, seed_extremes: bool = True):
        super().__init__(ctx, budget)
        space = ctx.space
        self.n_constr = len(ctx.constraints.active())
        self.problem = Problem(n_var=len(space.dims), n_obj=len(ctx.objectives), n_ieq_constr=self.n_constr,
                               xl=np.zeros(len(space.dims)), xu=space.upper_bounds.astype(float), vtype=int)
        self.algorithm = NSGA2(
            pop_size=population,
            sampling=self._initial_population(population, seed_extremes),
            crossover=SBX(prob=crossover_prob, eta=crossover_eta, vtype=float, repair=RoundingRepair()),
            mutation=PM(eta=mutation_eta, vtype=float, repair=RoundingRepair()),
            eliminate_duplicates=True,
        )
        self.algorithm.setup(self.problem, seed=ctx.seed, verbose=False)
        self._pending = None

    def _initial_population(self, population: int, seed_extremes: bool) -> np.ndarray:
        """Uniform random genomes; with `seed_extremes` the first two are the smallest and largest subnets,
        the two the sandwich rule trains at every step, so the front starts anchored at both ends."""
        space = self.ctx.space
        genomes = self.ctx.rng(salt=1).integers(0, space.upper_bounds + 1, size=(population, len(space.dims)))
        if seed_extremes and population >= 2:
            genomes[0], genomes[1] = space.encode(space.min_arch()), space.encode(space.max_arch())
        return genomes.astype(float)

    def _ask(self) -> list[Arch]:
        self._pending = self.algorithm.ask()
        if self._pending is None:  # mating found no offspring that is not a duplicate: a small space is exhausted
            return []
        archs = [self.ctx.space.decode(x) for x in self._pending.get("X")]
        # Store the canonical genome so pymoo's duplicate elimination sees equal networks as equal.
        self._pending.set("X", np.stack([self.ctx.space.encode(a) for a in archs]))
        return archs

    def ask(self) -> list[Arch]:
        archs = super().ask()
        if archs and len(archs) < len(self._pending):  # budget cut the last generation short
            self._pending = self._pending[: len(archs)]
        return archs

    def _tell(self, archs: list[Arch], records: list[Record]) -> None:
        F = np.array([self.ctx.minimised(r) for r in records], dtype=float)
        kwargs = {"F": F}
        if self.n_constr:
            kwargs["G"] = np.array([self.ctx.constraints.violations(r) for r in records], dtype=float)
        Evaluator().eval(StaticProblem(self.problem, **kwargs), self._pending)
        self.algorithm.tell(infills=self._pending)
