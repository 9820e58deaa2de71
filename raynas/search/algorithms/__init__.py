"""Search algorithms: each an ask/tell object that sees only the space, estimates and constraints.

To add one: subclass `SearchAlgorithm` (set `name` and `PARAMS`) and declare it in `ALGORITHMS`.
"""

from __future__ import annotations

from typing import Any

from raynas.registry import Registry
from raynas.search.algorithms.base import Constraints, SearchAlgorithm, SearchContext

ALGORITHMS = Registry("search.algorithm", {
    "nsga2": "raynas.search.algorithms.nsga2:NSGA2Search",
    "coarse-to-fine": "raynas.search.algorithms.coarse_to_fine:CoarseToFineSearch",
    "evolution": "raynas.search.algorithms.evolution:EvolutionarySearch",
    "scanedge": "raynas.search.algorithms.scanedge:ScanEdgeSearch",
    "random": "raynas.search.algorithms.random_search:RandomSearch",
})


def algorithm_class(name: str) -> type[SearchAlgorithm]:
    return ALGORITHMS.get(name)


def build_algorithm(name: str, ctx: SearchContext, budget: int, **params: Any) -> SearchAlgorithm:
    return algorithm_class(name)(ctx, budget, **params)


__all__ = ["ALGORITHMS", "Constraints", "SearchAlgorithm", "SearchContext", "algorithm_class", "build_algorithm"]
