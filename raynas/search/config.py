"""The `raynas search` configuration, validated completely before any compute starts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from raynas import storage
from raynas.config_utils import check_known, one_of, positive_float, positive_int, section
from raynas.errors import ConfigError

ALGORITHMS = ("nsga2", "coarse-to-fine", "evolution", "scanedge", "random")
OBJECTIVES = ("accuracy", "latency_ms", "params", "macs")
LATENCY_MODELS = ("lut", "linear", "flops", "params")

# Algorithm keyword arguments a user may set (name -> allowed keys).
ALGORITHM_PARAMS = {
    "nsga2": ("population", "crossover_prob", "crossover_eta", "mutation_eta", "seed_extremes"),
    "coarse-to-fine": ("coarse_samples", "population", "parents", "depth_prob", "block_prob"),
    "evolution": ("population", "parents", "gene_prob", "depth_prob", "crossover_fraction"),
    "scanedge": ("population", "parents", "gene_prob", "top_k", "momentum", "delta", "predictor_min_samples",
                 "predictor_candidates"),
    "random": ("batch_size",),
}

DEFAULTS = {
    "checkpoint": None,
    "run_dir": "runs/search",
    "data": {"name": "digits"},
    "evaluator": {"num_actors": 2, "bn_samples": 2048, "batch_size": 256, "device": "cpu", "threads": 1},
    "latency": {"model": "lut", "lut": None, "device": "local-cpu", "devices_file": None},
    "search": {"algorithm": "nsga2", "budget": 200, "seed": 0, "objectives": ["accuracy", "latency_ms"],
               "params": {}},
    "constraints": {"max_latency_ms": None, "max_params": None, "max_macs": None},
    "export": {"top_k": 3, "measure": True},
}


def validate_search_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    check_known(cfg, DEFAULTS, "config")
    out: dict[str, Any] = {}
    # Locations are made absolute here: the config is stored with the run and read by other nodes.
    checkpoint = cfg.get("checkpoint")
    if checkpoint is not None and (not isinstance(checkpoint, str) or not checkpoint):
        raise ConfigError("checkpoint: expected the location (a path or URI) of a supernet checkpoint")
    out["checkpoint"] = storage.normalize(checkpoint) if checkpoint else None
    run_dir = cfg.get("run_dir", DEFAULTS["run_dir"])
    if not isinstance(run_dir, str) or not run_dir:
        raise ConfigError(f"run_dir: expected a directory path or URI (s3://bucket/prefix), got {run_dir!r}")
    out["run_dir"] = storage.normalize(run_dir)
    out["data"] = dict(cfg.get("data") or DEFAULTS["data"])  # validated by raynas.data on use

    ev = section(cfg, "evaluator", DEFAULTS["evaluator"])
    positive_int(ev["num_actors"], "evaluator.num_actors")
    positive_int(ev["bn_samples"], "evaluator.bn_samples")
    positive_int(ev["batch_size"], "evaluator.batch_size")
    positive_int(ev["threads"], "evaluator.threads")
    if not isinstance(ev["device"], str) or not (ev["device"] == "cpu" or ev["device"].startswith("cuda")):
        raise ConfigError(f"evaluator.device: {ev['device']!r} is not allowed; allowed: cpu, cuda, cuda:N")
    out["evaluator"] = ev

    lat = section(cfg, "latency", DEFAULTS["latency"])
    one_of(lat["model"], LATENCY_MODELS, "latency.model")
    if lat["lut"] is not None and (not isinstance(lat["lut"], str) or not lat["lut"]):
        raise ConfigError("latency.lut: expected the location (a path or URI) of a LUT Parquet file")
    if lat["lut"]:
        lat["lut"] = storage.normalize(lat["lut"])
    out["latency"] = lat

    s = section(cfg, "search", DEFAULTS["search"])
    one_of(s["algorithm"], ALGORITHMS, "search.algorithm")
    positive_int(s["budget"], "search.budget")
    positive_int(s["seed"], "search.seed", minimum=0)
    objectives = s["objectives"]
    if not isinstance(objectives, list) or not objectives or objectives[0] != "accuracy":
        raise ConfigError(f"search.objectives: a list starting with 'accuracy', then any of {list(OBJECTIVES[1:])}")
    for i, o in enumerate(objectives):
        one_of(o, OBJECTIVES, f"search.objectives[{i}]")
    if len(set(objectives)) != len(objectives):
        raise ConfigError("search.objectives: each objective at most once")
    if not isinstance(s["params"], Mapping):
        raise ConfigError("search.params: expected a mapping of algorithm settings")
    check_known(s["params"], ALGORITHM_PARAMS[s["algorithm"]], "search.params")
    out["search"] = s

    c = section(cfg, "constraints", DEFAULTS["constraints"])
    positive_float(c["max_latency_ms"], "constraints.max_latency_ms", optional=True)
    positive_int(c["max_params"], "constraints.max_params", optional=True)
    positive_int(c["max_macs"], "constraints.max_macs", optional=True)
    out["constraints"] = c

    e = section(cfg, "export", DEFAULTS["export"])
    positive_int(e["top_k"], "export.top_k", minimum=0)
    if not isinstance(e["measure"], bool):
        raise ConfigError(f"export.measure: expected true or false, got {e['measure']!r}")
    out["export"] = e
    return out
