"""Search over (big, little[, split]) pairs (NSGA-II by default): objectives accuracy and E[latency] on one
device, constraint on the peak latency. `raynas search`'s machinery runs it unchanged
(`raynas.search.runner.search_front`): any registered algorithm over the pair space, an `ActorPool` of
evaluator actors (dead ones replaced), `run_search` and `ResultStore`.

An evaluator actor holds the coupled supernet and scores a pair: both models BN-recalibrated, routed at
`tau` by the checkpoint's router on the validation set -> accuracy, routing ratio, oracle gap, ECE. The
driver adds the pair's costs at that routing ratio (E[latency], E[MACs], peak, memory) before storing,
and `SearchContext.estimate` gives the data-free peak latency the constraint reads.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import ray
import torch
import yaml

from raynas import config as c
from raynas import storage
from raynas.biglittle.costs import PairCostModel, PieceLatency, calibrated_proxy_latency
from raynas.biglittle.coupling import load_coupled
from raynas.search.runner import log
from raynas.space import Arch

OBJECTIVES = ("accuracy", "e_latency_ms", "e_macs", "e_macs_deployed", "peak_latency_ms", "memory_bytes")
CALIBRATED_HERE = "flops"  # the latency model that needs no LUT: calibrated on this node (`latency_for`)
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
    "latency": {"model": CALIBRATED_HERE, "lut": None, "device": "local-cpu", "devices_file": None,
                "calibration_subnets": 6},
    "search": {"algorithm": "nsga2", "budget": 60, "seed": 0, "objectives": ["accuracy", "e_latency_ms"],
               "params": {}},
    "constraints": {"max_peak_latency_ms": None},
}


def validate_pair_search_config(cfg: dict[str, Any]) -> dict[str, Any]:
    from raynas.data import validate_data_config
    from raynas.search.config import latency_section, search_section

    cfg = c.mapping(cfg, "config")
    c.check_known(cfg, DEFAULTS, "config")
    if cfg.get("checkpoint") is None:
        c.fail("checkpoint", "missing", "a coupled supernet trained with strategy 'biglittle'")
    # Locations are made absolute here: the config is stored with the run and read by other nodes.
    out: dict[str, Any] = {"checkpoint": c.location(cfg["checkpoint"], "checkpoint"),
                           "run_dir": c.location(cfg.get("run_dir", DEFAULTS["run_dir"]), "run_dir"),
                           "data": validate_data_config(cfg.get("data") or DEFAULTS["data"])}
    out["tau"] = c.number(cfg.get("tau", DEFAULTS["tau"]), "tau", 0.0, 1.0)
    out["router"] = c.choice(cfg.get("router", DEFAULTS["router"]), "router", ("checkpoint", "confidence"))
    ev = out["evaluator"] = c.section(cfg, "evaluator", DEFAULTS["evaluator"])
    for key in ev:
        c.integer(ev[key], f"evaluator.{key}", 1)
    lat = out["latency"] = latency_section(cfg, DEFAULTS["latency"])
    if lat["model"] != CALIBRATED_HERE and not lat["lut"]:
        c.fail("latency.lut", f"missing for latency.model '{lat['model']}'",
               f"a LUT built with raynas profile, or latency.model '{CALIBRATED_HERE}' without one")
    c.integer(lat["calibration_subnets"], "latency.calibration_subnets", 2)
    out["search"] = search_section(cfg, DEFAULTS["search"], OBJECTIVES)
    cons = out["constraints"] = c.section(cfg, "constraints", DEFAULTS["constraints"])
    c.number(cons["max_peak_latency_ms"], "constraints.max_peak_latency_ms", 0.0, low_open=True, optional=True)
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
    import numpy as np

    # no LUT: the model is CALIBRATED_HERE (the config was refused otherwise)
    space = model.space
    rng = np.random.default_rng(cfg["search"]["seed"])
    archs = [space.min_arch(), space.max_arch()]
    archs += [space.sample(rng) for _ in range(lat["calibration_subnets"] - 2)]
    return PieceLatency(calibrated_proxy_latency(model.big_net.eval(), archs, lat["device"], lat["devices_file"]))


def run_pair_search(cfg: dict[str, Any], resume: bool = False) -> dict[str, Any]:
    from raynas.search.algorithms import Constraints, SearchContext
    from raynas.search.runner import prepare_run_dir, search_front

    cfg = validate_pair_search_config(cfg)
    started = time.time()
    run_dir = prepare_run_dir(cfg, resume)
    model = load_model(cfg["checkpoint"], cfg["router"])
    latency = latency_for(cfg, model)
    cost_model = PairCostModel(model, latency)
    s, ev = cfg["search"], cfg["evaluator"]
    constraints = Constraints(max_latency_ms=cfg["constraints"]["max_peak_latency_ms"])
    ctx = SearchContext(space=model.pair_space, estimate=cost_model.estimate, constraints=constraints,
                        objectives=tuple(s["objectives"]), seed=s["seed"])
    evaluator = PairEvaluatorConfig(cfg["data"], cfg["tau"], cfg["router"], ev["bn_samples"], ev["batch_size"],
                                    ev["threads"])
    found = search_front(run_dir, ctx, s, cfg["latency"]["device"], resume,
                         lambda: pair_pool(cfg["checkpoint"], evaluator, ev["num_actors"]),
                         lambda pool: with_costs(pool, cost_model))
    records, front = found.records, found.front
    summary = {
        "space": model.pair_space.name, "coupling": model.coupling, "router": model.router.name,
        "tau": cfg["tau"], "algorithm": found.algorithm.name, "budget": s["budget"], "evaluations": len(records),
        "feasible": sum(bool(r["feasible"]) for r in records), "front": len(front),
        "objectives": list(ctx.objectives), "latency_model": latency.kind,
        "actors_replaced": found.actors_replaced, "wall_s": round(time.time() - started, 1),
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
