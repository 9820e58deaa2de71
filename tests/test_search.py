"""Search algorithms, the result store, resume, and the self-healing actor pool."""

import math
import os
import zlib

import numpy as np
import pytest
import ray

from raynas.search.algorithms import Constraints, SearchContext, build_algorithm
from raynas.search.config import ALGORITHMS
from raynas.search.driver import estimate_fn, run_search
from raynas.search.pareto import hypervolume, pareto_front
from raynas.search.pool import ActorPool
from raynas.search.results import ResultStore
from raynas.space import Arch, load_space
from raynas.supernets import build_supernet


@pytest.fixture(scope="module")
def supernet():
    return build_supernet(load_space("nb201", resolution=32, num_classes=10))


class MacsLatency:
    """A deterministic stand-in latency model for algorithm tests: 1 ms per 10 MMACs."""

    def __init__(self, supernet):
        self.supernet = supernet

    def predict(self, arch):
        return self.supernet.cost(arch)["macs"] / 1e7


def score(arch_json: str) -> dict:
    """A deterministic accuracy landscape over nb201: convs help, 'none' edges hurt, plus a fixed jitter."""
    arch = Arch.from_json(arch_json)
    gain = {"none": 0.0, "skip_connect": 0.3, "avg_pool_3x3": 0.2, "nor_conv_1x1": 0.6, "nor_conv_3x3": 1.0}
    value = sum(gain[op] for op in arch.values()) / 6
    jitter = (zlib.crc32(arch_json.encode()) % 1000) / 1e5  # fixed tie-breaker
    return {"accuracy": 0.5 + 0.4 * value + jitter}


def local_evaluator(calls: list):
    def evaluate(arch_jsons):
        for a in arch_jsons:
            calls.append(a)
            yield a, score(a)
    return evaluate


def make_ctx(supernet, constraints=None, seed=0):
    return SearchContext(space=supernet.space, estimate=estimate_fn(supernet, MacsLatency(supernet)),
                         constraints=constraints or Constraints(), seed=seed)


SMALL = {"nsga2": {"population": 12}, "coarse-to-fine": {"population": 12, "parents": 4, "coarse_samples": 300},
         "evolution": {"population": 12, "parents": 4}, "random": {"batch_size": 12},
         "scanedge": {"population": 12, "parents": 4, "top_k": 4, "predictor_candidates": 100}}


@pytest.mark.parametrize("name", ALGORITHMS)
def test_algorithms_respect_constraints_and_budget(name, supernet, tmp_path):
    macs = [supernet.cost(supernet.space.sample(np.random.default_rng(i)))["macs"] for i in range(50)]
    bound = float(np.median(macs)) / 1e7  # about half the space violates it
    ctx = make_ctx(supernet, Constraints(max_latency_ms=bound))
    algo = build_algorithm(name, ctx, budget=36, **SMALL[name])
    calls = []
    records = run_search(algo, local_evaluator(calls), ResultStore(tmp_path / "ev"), progress=lambda m: None)
    assert 0 < len(records) <= 36
    assert len(calls) == len(set(calls)), "an arch was evaluated twice"
    front = pareto_front([r for r in records if r["feasible"]], ctx.objectives)
    assert front and all(r["latency_ms"] <= bound for r in front)
    if name != "nsga2":  # the others never even evaluate a candidate that breaks the constraint
        assert all(r["latency_ms"] <= bound for r in records)
    else:  # NSGA-II explores infeasible offspring, but constraint domination keeps its survivors feasible
        survivors = algo.algorithm.pop.get("G")
        assert (survivors <= 0).all()


@pytest.mark.parametrize("seed_extremes", [True, False])
def test_nsga2_first_generation_is_anchored_at_both_ends(supernet, tmp_path, seed_extremes):
    space = supernet.space
    algo = build_algorithm("nsga2", make_ctx(supernet), budget=12, population=12, seed_extremes=seed_extremes)
    records = run_search(algo, local_evaluator([]), ResultStore(tmp_path / "ev"), progress=lambda m: None)
    first = {r["arch"] for r in records if r["generation"] == 0}
    assert len(first) == 12
    extremes = {space.min_arch().to_json(), space.max_arch().to_json()}
    assert (extremes <= first) == seed_extremes


def test_guided_search_beats_its_first_generation(supernet, tmp_path):
    """Evolution must improve on the random population it starts from (it learns from told results)."""
    ctx = make_ctx(supernet)
    algo = build_algorithm("evolution", ctx, budget=60, population=12, parents=4)
    records = run_search(algo, local_evaluator([]), ResultStore(tmp_path / "ev"), progress=lambda m: None)
    first = max(r["accuracy"] for r in records if r["generation"] == 0)
    assert max(r["accuracy"] for r in records) > first


def test_resume_reevaluates_nothing_and_ends_identically(supernet, tmp_path):
    budget, params = 30, {"population": 10}
    full_calls = []
    full = run_search(build_algorithm("nsga2", make_ctx(supernet), budget, **params), local_evaluator(full_calls),
                      ResultStore(tmp_path / "full"), progress=lambda m: None)

    class Killed(Exception):
        pass

    def dying_evaluator(arch_jsons):
        for i, (a, r) in enumerate(local_evaluator([])(arch_jsons)):
            if i == 4 and len(arch_jsons) == 10 and first_run:
                raise Killed  # the search process dies mid-population
            yield a, r

    first_run = True
    store_dir = tmp_path / "resumed"
    with pytest.raises(Killed):
        run_search(build_algorithm("nsga2", make_ctx(supernet), budget, **params), dying_evaluator,
                   ResultStore(store_dir), progress=lambda m: None)
    stored_before = len(ResultStore(store_dir))
    assert stored_before == 4

    first_run = False
    resumed_calls = []
    resumed = run_search(build_algorithm("nsga2", make_ctx(supernet), budget, **params),
                         local_evaluator(resumed_calls), ResultStore(store_dir), progress=lambda m: None)
    assert len(resumed_calls) == len(set(full_calls)) - stored_before
    assert [r["arch"] for r in resumed] == [r["arch"] for r in full]
    store = ResultStore(store_dir)
    assert len(store) == len(set(full_calls))
    assert store.to_pandas()["arch"].is_unique


def test_hypervolume_and_front():
    recs = [{"accuracy": 0.9, "latency_ms": 2.0}, {"accuracy": 0.8, "latency_ms": 1.0},
            {"accuracy": 0.7, "latency_ms": 3.0}]
    front = pareto_front(recs, ("accuracy", "latency_ms"))
    assert [r["latency_ms"] for r in front] == [1.0, 2.0]
    # dominated region w.r.t. (accuracy 0, latency 4): 0.9*2 + 0.8*1
    assert math.isclose(hypervolume(recs, ("accuracy", "latency_ms"), [0.0, 4.0]), 2.6)


class FlakyScorer:
    """Evaluator actor whose process dies (os._exit) on its second call, once per test run."""

    def __init__(self, marker: str):
        self.marker, self.calls = marker, 0

    def evaluate(self, arch_json):
        self.calls += 1
        if self.calls == 2 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return {"accuracy": score(arch_json)["accuracy"], "pid": os.getpid()}


def test_actor_killed_mid_population_is_replaced(ray_local, supernet, tmp_path):
    remote = ray.remote(num_cpus=0.5, max_restarts=0)(FlakyScorer)
    pool = ActorPool(lambda: remote.remote(str(tmp_path / "died")), num_actors=2)
    ctx = make_ctx(supernet)
    algo = build_algorithm("random", ctx, budget=16, batch_size=8)

    def evaluate(arch_jsons):
        yield from pool.map_unordered(arch_jsons)

    store = ResultStore(tmp_path / "ev")
    records = run_search(algo, evaluate, store, progress=lambda m: None)
    pool.shutdown()
    assert (tmp_path / "died").exists() and pool.replaced == 1
    assert len(records) == 16 and len(store) == 16
    assert store.to_pandas()["arch"].is_unique
    assert len(set(store.to_pandas()["pid"])) >= 2
