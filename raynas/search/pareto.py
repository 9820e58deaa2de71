"""Pareto fronts and hypervolume over evaluation records."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pymoo.indicators.hv import HV
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from raynas.search.algorithms.base import Record


def minimised_matrix(records: Sequence[Record], objectives: Sequence[str]) -> np.ndarray:
    return np.array([[-float(r[o]) if o == "accuracy" else float(r[o]) for o in objectives] for r in records],
                    dtype=float).reshape(len(records), len(objectives))


def pareto_front(records: Sequence[Record], objectives: Sequence[str]) -> list[Record]:
    """Non-dominated records, sorted by the second objective (e.g. latency) ascending."""
    if not records:
        return []
    F = minimised_matrix(records, objectives)
    idx = NonDominatedSorting().do(F, only_non_dominated_front=True)
    front = [records[i] for i in idx]
    return sorted(front, key=lambda r: tuple(float(r[o]) for o in objectives[1:]))


def hypervolume(records: Sequence[Record], objectives: Sequence[str], ref_point: Sequence[float]) -> float:
    """Hypervolume of the records' minimised objective vectors w.r.t. `ref_point` (minimised space)."""
    if not records:
        return 0.0
    F = minimised_matrix(records, objectives)
    F = F[np.all(F <= np.asarray(ref_point), axis=1)]
    if len(F) == 0:
        return 0.0
    return float(HV(ref_point=np.asarray(ref_point, dtype=float))(F))
