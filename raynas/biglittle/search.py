"""NSGA-II over (big, little[, split]) pairs: objectives accuracy and E[latency] on one device, constraint
on the peak latency. The search issue's machinery runs it unchanged: `NSGA2Search` over the pair space's
integer encoding, `ActorPool` of evaluator actors (dead ones replaced), `run_search` and `ResultStore`.

An evaluator actor holds the coupled supernet and scores a pair: both models BN-recalibrated, routed at
`tau` by the checkpoint's router on the validation set -> accuracy, routing ratio, oracle gap, ECE. The
driver adds the pair's costs at that routing ratio (E[latency], E[MACs], peak, memory) before storing,
and `SearchContext.estimate` gives the data-free peak latency the constraint reads.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd
import ray
import torch
import yaml

from raynas import storage
from raynas.biglittle.costs import PairCostModel, PieceLatency, calibrated_proxy_latency
from raynas.biglittle.coupling import load_coupled
from raynas.config_utils import check_known, one_of, positive_float, positive_int, section
from raynas.errors import ConfigError
from raynas.space import Arch

OBJECTIVES = ("accuracy", "e_latency_ms", "e_macs", "e_macs_deployed", "peak_latency_ms", "memory_bytes")
DEFAULTS = {
    "checkpoint": None,
    "run_dir": "runs/biglittle_search",
    "data": {"name": "digits"},
    "tau": 0.8,
    # 'checkpoint': the router the supernet was co-trained with; 'confidence': judge pairs as cascades
    "router": "checkpoint",
    "evaluator": {"num_actors": 2, "bn_samples": 512, "batch_size": 256, "threads": 1},
    # model: a latency model of raynas.hw over `lut` (its calibration next to it); without a LUT the
    # flops proxy is calibrated here by timing `calibration_subnets` random subnets on this node
    "latency": {"model": "flops", "lut": None, "device": "local-cpu", "devices_file": None,
                "calibration_subnets": 6},
    "search": {"algorithm": "nsga2", "budget": 60, "seed": 0, "objectives": ["accuracy", "e_latency_ms"],
               "params": {}},
    "constraints": {"max_peak_latency_ms": None},
}
ALGORITHM_PARAMS = ("population", "crossover_prob", "crossover_eta", "mutation_eta")


def validate_pair_search_config(cfg: dict[str, Any]) -> dict[str, Any]:
    check_known(cfg, DEFAULTS, "config")
    out: dict[str, Any] = {"checkpoint": cfg.get("checkpoint"), "run_dir": cfg.get("run_dir", DEFAULTS["run_dir"]),
                           "data": dict(cfg.get("data") or DEFAULTS["data"])}
    if not isinstance(out["checkpoint"], str) or not out["checkpoint"]:
        raise ConfigError("checkpoint: required (a coupled supernet trained with strategy 'biglittle')")
    if not isinstance(out["run_dir"], str) or not out["run_dir"]:
        raise ConfigError(f"run_dir: expected a directory path or URI (s3://bucket/prefix), got {out['run_dir']!r}")
    # Locations are made absolute here: the config is stored with the run and read by other nodes.
    out["checkpoint"], out["run_dir"] = storage.normalize(out["checkpoint"]), storage.normalize(out["run_dir"])
    tau = cfg.get("tau", DEFAULTS["tau"])
    if not (isinstance(tau, (int, float)) and not isinstance(tau, bool) and 0 <= tau <= 1):
        raise ConfigError(f"tau: expected a number in [0, 1], got {tau!r}")
    out["tau"] = float(tau)
    out["router"] = one_of(cfg.get("router", DEFAULTS["router"]), ("checkpoint", "confidence"), "router")
    ev = out["evaluator"] = section(cfg, "evaluator", DEFAULTS["evaluator"])
    for key in ev:
        positive_int(ev[key], f"evaluator.{key}")
    lat = out["latency"] = section(cfg, "latency", DEFAULTS["latency"])
    one_of(lat["model"], ("lut", "linear", "flops", "params"), "latency.model")
    if lat["model"] in ("lut", "linear") and not lat["lut"]:
        raise ConfigError(f"latency.lut: required for latency.model '{lat['model']}' (build one with raynas profile)")
    positive_int(lat["calibration_subnets"], "latency.calibration_subnets", minimum=2)
    s = out["search"] = section(cfg, "search", DEFAULTS["search"])
    one_of(s["algorithm"], ("nsga2", "random"), "search.algorithm")
    positive_int(s["budget"], "search.budget")
    positive_int(s["seed"], "search.seed", minimum=0)
    if not (isinstance(s["objectives"], list) and s["objectives"] and s["objectives"][0] == "accuracy"):
        raise ConfigError(f"search.objectives: a list starting with 'accuracy', then any of {list(OBJECTIVES[1:])}")
    for i, o in enumerate(s["objectives"]):
        one_of(o, OBJECTIVES, f"search.objectives[{i}]")
    check_known(s["params"] or {}, ALGORITHM_PARAMS if s["algorithm"] == "nsga2" else ("batch_size",),
                "search.params")
    c = out["constraints"] = section(cfg, "constraints", DEFAULTS["constraints"])
    positive_float(c["max_peak_latency_ms"], "constraints.max_peak_latency_ms", optional=True)
    return out


@dataclass(frozen=True)
class PairEvaluatorConfig:
    data: dict
    tau: float
    router: str = "checkpoint"
    bn_samples: int = 512
    batch_size: int = 256
    threads: int = 1


class PairEvaluator:
    """Ray actor body: the coupled supernet and fixed BN/validation sets; scores pairs."""

    def __init__(self, checkpoint: bytes, config: PairEvaluatorConfig):
        from raynas.biglittle.evaluate import eval_data

        torch.set_num_threads(config.threads)
        self.config = config
        self.model = load_model(checkpoint, config.router)
        space = self.model.space
        self.data = eval_data(config.data, space.resolution, space.in_channels, config.bn_samples, config.batch_size)
        self.identity = f"{socket.gethostname()}:{os.getpid()}"

    def evaluate(self, pair_json: str) -> dict[str, Any]:
        from raynas.biglittle.evaluate import predict_pair
        from raynas.biglittle.metrics import evaluate_routing

        started = time.time()
        pred = predict_pair(self.model, Arch.from_json(pair_json), self.data)
        metrics = evaluate_routing(pred, self.config.tau)
        finished = time.time()
        return {**metrics, "started_at": started, "finished_at": finished, "eval_s": finished - started,
                "worker": self.identity}

    def pid(self) -> int:
        return os.getpid()


def load_model(checkpoint: str | bytes, router: str = "checkpoint"):
    """The coupled supernet, with the confidence cascade in place of its router when asked."""
    from raynas.biglittle.routers import ConfidenceRouter

    model = load_coupled(checkpoint)
    if router == "confidence":
        model.router = ConfidenceRouter()
    return model


def pair_pool(checkpoint: str, config: PairEvaluatorConfig, num_actors: int):
    """Evaluator actors; the checkpoint (path or URI) reaches them through the object store, never by path."""
    from raynas.search.pool import ActorPool

    ref = ray.put(storage.read_bytes(checkpoint, "checkpoint"))
    remote_cls = ray.remote(num_cpus=config.threads, max_restarts=0)(PairEvaluator)
    return ActorPool(lambda: remote_cls.remote(ref, config), num_actors)


def with_costs(pool, cost_model: PairCostModel):
    """`run_search` evaluator: the actors' routing metrics plus the pair's costs at that routing ratio."""

    def evaluate(pair_jsons: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        for pair_json, result in pool.map_unordered(pair_jsons):
            costs = cost_model.costs(Arch.from_json(pair_json))
            yield pair_json, {**result, **costs.summary(result["routing_ratio"])}

    return evaluate


def latency_for(cfg: dict[str, Any], model) -> PieceLatency:
    lat = cfg["latency"]
    if lat["lut"]:
        from raynas.hw.latency import load_latency_model

        return PieceLatency(load_latency_model(lat["model"], lat["lut"], supernet=model.big_net, device=lat["device"],
                                               devices_file=lat["devices_file"]))
    if lat["model"] != "flops":
        raise ConfigError(f"latency.model: '{lat['model']}' needs latency.lut; without one only 'flops' "
                          "(calibrated here) is available")
    import numpy as np

    space = model.space
    rng = np.random.default_rng(cfg["search"]["seed"])
    archs = [space.min_arch(), space.max_arch()]
    archs += [space.sample(rng) for _ in range(lat["calibration_subnets"] - 2)]
    return PieceLatency(calibrated_proxy_latency(model.big_net.eval(), archs, lat["device"], lat["devices_file"]))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_pair_search(cfg: dict[str, Any], resume: bool = False) -> dict[str, Any]:
    from raynas.hw.devices import init_local_ray
    from raynas.search.algorithms import Constraints, SearchContext, build_algorithm
    from raynas.search.driver import run_search
    from raynas.search.pareto import pareto_front
    from raynas.search.results import ResultStore
    from raynas.search.runner import prepare_run_dir

    cfg = validate_pair_search_config(cfg)
    started = time.time()
    run_dir = prepare_run_dir(cfg, resume)
    model = load_model(cfg["checkpoint"], cfg["router"])
    latency = latency_for(cfg, model)
    cost_model = PairCostModel(model, latency)
    s = cfg["search"]
    constraints = Constraints(max_latency_ms=cfg["constraints"]["max_peak_latency_ms"])
    ctx = SearchContext(space=model.pair_space, estimate=cost_model.estimate, constraints=constraints,
                        objectives=tuple(s["objectives"]), seed=s["seed"])
    algorithm = build_algorithm(s["algorithm"], ctx, s["budget"], **(s["params"] or {}))
    store = ResultStore(storage.join(run_dir, "evaluations"))
    init_local_ray(devices=[cfg["latency"]["device"]])
    ev = cfg["evaluator"]
    pool = pair_pool(cfg["checkpoint"], PairEvaluatorConfig(cfg["data"], cfg["tau"], cfg["router"], ev["bn_samples"],
                                                            ev["batch_size"], ev["threads"]), ev["num_actors"])
    try:
        asked = run_search(algorithm, with_costs(pool, cost_model), store, progress=log)
    finally:
        pool.shutdown()
    records = list({r["arch"]: r for r in asked}.values())
    store.compact(storage.join(run_dir, "evaluations.parquet"))
    front = pareto_front([r for r in records if r["feasible"]], ctx.objectives)
    storage.write_pandas(storage.join(run_dir, "front.parquet"), pd.DataFrame(front))
    summary = {
        "space": model.pair_space.name, "coupling": model.coupling, "router": model.router.name,
        "tau": cfg["tau"], "algorithm": algorithm.name, "budget": s["budget"], "evaluations": len(records),
        "feasible": sum(bool(r["feasible"]) for r in records), "front": len(front),
        "objectives": list(ctx.objectives), "latency_model": latency.kind,
        "actors_replaced": pool.replaced, "wall_s": round(time.time() - started, 1),
        "front_points": [{k: r[k] for k in ("arch", "accuracy", "e_latency_ms", "peak_latency_ms", "e_macs",
                                            "routing_ratio") if k in r} for r in front],
    }
    storage.write_text(storage.join(run_dir, "summary.yaml"), yaml.safe_dump(summary, sort_keys=False))
    _plot_front(records, front, storage.join(run_dir, "pareto.png"), ctx.objectives[1])
    log(f"[biglittle search] {len(records)} pairs, front of {len(front)}; {storage.display(run_dir)}")
    return {**summary, "run_dir": run_dir}


def _plot_front(records, front, out: str, x: str) -> None:
    from raynas.report.pareto_report import plot_pareto

    if records and x in records[0]:
        plot_pareto(records, front, out, x=x, title="big/little pairs: routed accuracy vs " + x)


__all__ = ["PairEvaluator", "PairEvaluatorConfig", "run_pair_search", "validate_pair_search_config"]
