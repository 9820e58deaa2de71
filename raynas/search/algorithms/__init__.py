"""Search algorithms: each an ask/tell object that sees only the space, estimates and constraints."""

from __future__ import annotations

import importlib
from typing import Any

from raynas.search.algorithms.base import Constraints, SearchAlgorithm, SearchContext

_REGISTRY = {
    "nsga2": ("raynas.search.algorithms.nsga2", "NSGA2Search"),
    "coarse-to-fine": ("raynas.search.algorithms.coarse_to_fine", "CoarseToFineSearch"),
    "evolution": ("raynas.search.algorithms.evolution", "EvolutionarySearch"),
    "scanedge": ("raynas.search.algorithms.scanedge", "ScanEdgeSearch"),
    "random": ("raynas.search.algorithms.random_search", "RandomSearch"),
}


def build_algorithm(name: str, ctx: SearchContext, budget: int, **params: Any) -> SearchAlgorithm:
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)(ctx, budget, **params)


__all__ = ["Constraints", "SearchAlgorithm", "SearchContext", "build_algorithm"]
