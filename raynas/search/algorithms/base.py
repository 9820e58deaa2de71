"""What every search algorithm sees: the space, cheap estimates (latency model, params, MACs),
constraints and a budget. Algorithms are ask/tell objects; the driver evaluates what they ask.

Algorithms must be deterministic given their seed and the results they are told: a resumed
search replays them, and every arch already in the result store is answered from the store.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from raynas.space import Arch, SearchSpace

Record = dict[str, Any]


@dataclass(frozen=True)
class Constraints:
    """Upper bounds; `None` means unconstrained."""

    max_latency_ms: float | None = None
    max_params: int | None = None
    max_macs: int | None = None
    max_energy_mj: float | None = None  # energy per inference above idle (raynas.hw.energy_model)

    def active(self) -> list[tuple[str, float]]:
        """The bounds set, as (record field, bound), in a fixed order."""
        return [(key, bound) for key, bound in (("latency_ms", self.max_latency_ms), ("params", self.max_params),
                                                ("macs", self.max_macs), ("energy_mj", self.max_energy_mj))
                if bound is not None]

    def violations(self, est: Record) -> list[float]:
        """Relative violations (<= 0 means satisfied), one per active bound, in a fixed order. A value not
        known yet (NaN: a latency measured live, before its measurement) violates nothing."""
        out = []
        for key, bound in self.active():
            value = float(est[key])
            out.append(0.0 if math.isnan(value) else value / float(bound) - 1.0)
        return out

    def feasible(self, est: Record) -> bool:
        return all(v <= 0 for v in self.violations(est))


@dataclass
class SearchContext:
    space: SearchSpace
    # cheap: {"latency_ms", "params", "macs"} (and "energy_mj" when energy is asked) without training data
    estimate: Callable[[Arch], Record]
    constraints: Constraints = field(default_factory=Constraints)
    objectives: tuple[str, ...] = ("accuracy", "latency_ms")  # accuracy maximised, the rest minimised
    seed: int = 0

    def rng(self, salt: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, salt])

    def sample_feasible(self, rng: np.random.Generator, tries: int = 200) -> Arch | None:
        """Rejection-sample an arch meeting the constraints; None if `tries` samples all violate them."""
        for _ in range(tries):
            arch = self.space.sample(rng)
            if self.constraints.feasible(self.estimate(arch)):
                return arch
        return None

    def minimised(self, record: Record) -> list[float]:
        """Objective vector to minimise (accuracy negated)."""
        return [-float(record[o]) if o == "accuracy" else float(record[o]) for o in self.objectives]


class SearchAlgorithm(ABC):
    """Subclasses set `name` and `PARAMS` and are declared in `raynas.search.algorithms.ALGORITHMS`."""

    name: ClassVar[str] = "base"
    PARAMS: ClassVar[tuple[str, ...]] = ()  # the keyword arguments of __init__ a config may set (search.params)

    def __init__(self, ctx: SearchContext, budget: int):
        if budget < 1:
            raise ValueError("budget must be >= 1")
        self.ctx, self.budget = ctx, budget
        self.asked = 0
        self.history: list[Record] = []  # every record told, in order

    @property
    def remaining(self) -> int:
        return self.budget - self.asked

    @property
    def done(self) -> bool:
        return self.remaining <= 0

    def ask(self) -> list[Arch]:
        archs = self._ask()[: self.remaining]
        self.asked += len(archs)
        return archs

    def tell(self, archs: list[Arch], records: list[Record]) -> None:
        self.history.extend(records)
        self._tell(archs, records)

    @abstractmethod
    def _ask(self) -> list[Arch]: ...

    def _tell(self, archs: list[Arch], records: list[Record]) -> None:
        pass

    def best_feasible(self, records: list[Record], k: int) -> list[Record]:
        """Top-k by accuracy among constraint-satisfying records (infeasible ones last)."""
        ranked = sorted(records, key=lambda r: (not self.ctx.constraints.feasible(r), -r["accuracy"]))
        return ranked[:k]
