"""The `raynas search` configuration, validated completely before any compute starts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from raynas import config as c
from raynas.hw.latency import MODEL_KINDS
from raynas.search.algorithms import ALGORITHMS as ALGORITHM_REGISTRY
from raynas.search.algorithms import algorithm_class
from raynas.search.deployed import DEPLOY_DEFAULTS, deploy_section

ALGORITHMS = tuple(ALGORITHM_REGISTRY.names())
OBJECTIVES = ("accuracy", "latency_ms", "params", "macs", "energy_mj")
LIVE = "live"  # no model: every candidate measured on the device (raynas.search.live)
LATENCY_MODELS = (*MODEL_KINDS, LIVE)
CORRECTIONS = ("auto", "on", "off")  # a predicting latency model corrected by live measurements

# Every algorithm setting a user may set, with its range: (kind, low, high); None = unbounded.
PARAM_RANGES: dict[str, tuple[str, float | None, float | None]] = {
    "population": ("int", 2, None), "parents": ("int", 1, None), "coarse_samples": ("int", 1, None),
    "top_k": ("int", 1, None), "predictor_min_samples": ("int", 1, None), "predictor_candidates": ("int", 1, None),
    "batch_size": ("int", 1, None),
    "crossover_prob": ("number", 0.0, 1.0), "gene_prob": ("number", 0.0, 1.0), "depth_prob": ("number", 0.0, 1.0),
    "block_prob": ("number", 0.0, 1.0), "crossover_fraction": ("number", 0.0, 1.0), "momentum": ("number", 0.0, 1.0),
    "crossover_eta": ("number", 0.0, None), "mutation_eta": ("number", 0.0, None), "delta": ("number", 0.0, None),
    "seed_extremes": ("bool", None, None),
}

DEFAULTS = {
    "checkpoint": None,
    "run_dir": "runs/search",
    "data": {"name": "digits"},
    "evaluator": {"num_actors": 2, "bn_samples": 2048, "batch_size": 256, "device": "cpu", "threads": 1},
    "latency": {"model": "lut", "lut": None, "device": "local-cpu", "devices_file": None,
                "correction": "auto", "correction_per_generation": 4},
    "search": {"algorithm": "nsga2", "budget": 200, "seed": 0, "objectives": ["accuracy", "latency_ms"],
               "params": {}},
    "constraints": {"max_latency_ms": None, "max_params": None, "max_macs": None, "max_energy_mj": None},
    "export": {"top_k": 3, "measure": True},
    "deploy": DEPLOY_DEFAULTS,
}


def algorithm_params(params: Any, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
    """The algorithm settings, each known to the algorithm and in range (shared with the pair search)."""
    params = {} if params is None else c.mapping(params, where)
    c.check_known(params, allowed, where)
    for key, value in params.items():
        kind, low, high = PARAM_RANGES[key]
        if kind == "int":
            c.integer(value, c.join(where, key), low, high)
        elif kind == "number":
            c.number(value, c.join(where, key), low, high, low_open=key.endswith("_eta"))
        else:
            c.boolean(value, c.join(where, key))
    if params.get("parents", 0) > params.get("population", 50):
        c.fail(c.join(where, "parents"), f"{params['parents']} exceeds the population", "at most the population")
    return params


def objectives(value: Any, allowed: tuple[str, ...], field: str) -> list[str]:
    """'accuracy' first, then distinct objectives of `allowed`."""
    if not isinstance(value, list) or not value or value[0] != "accuracy":
        c.fail(field, f"got {value!r}", f"a list starting with 'accuracy', then any of {list(allowed[1:])}")
    for i, name in enumerate(value):
        c.choice(name, f"{field}[{i}]", allowed)
    if len(set(value)) != len(value):
        c.fail(field, f"got {value!r}", "each objective at most once")
    return value


def latency_device(lat: dict[str, Any], where: str = "latency") -> None:
    """The device must be declared (in the devices file, itself valid) now, not when the LUT is read."""
    from raynas.hw.devices import get_device

    lat["devices_file"] = c.location(lat["devices_file"], f"{where}.devices_file", optional=True)
    get_device(c.string(lat["device"], f"{where}.device"), lat["devices_file"], f"{where}.device")


def uses_energy(cfg: Mapping[str, Any]) -> bool:
    """Whether a validated search config asks for energy (an objective or a constraint): the search then
    predicts every candidate's energy from the LUT's energy column (raynas.hw.energy_model)."""
    return "energy_mj" in cfg["search"]["objectives"] or cfg["constraints"]["max_energy_mj"] is not None


def energy_device(lat: dict[str, Any]) -> None:
    """Energy needs a meter on the latency device (one line naming the device and the meters raynas knows)
    and a LUT measured with it: a live latency model without a LUT has nothing to predict energy from."""
    from raynas.hw.devices import get_device
    from raynas.hw.energy import require_energy

    require_energy(get_device(lat["device"], lat["devices_file"]))
    if lat["model"] == LIVE and not lat["lut"]:
        c.fail("latency.lut", "energy_mj is predicted from a LUT's energy column, and latency.model 'live' has no "
               "LUT", "a LUT built on the device with its meter (`raynas profile lut`)")


def latency_section(cfg: Mapping[str, Any], defaults: Mapping[str, Any],
                    allowed: tuple[str, ...] = MODEL_KINDS) -> dict[str, Any]:
    """The `latency:` section (model kind of `allowed`, LUT, device); shared with the pair search."""
    lat = c.section(cfg, "latency", defaults)
    c.choice(lat["model"], "latency.model", allowed)
    lat["lut"] = c.location(lat["lut"], "latency.lut", optional=True)
    latency_device(lat)
    return lat


def search_section(cfg: Mapping[str, Any], defaults: Mapping[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    """The `search:` section (a registered algorithm and its settings, budget, seed, objectives of
    `allowed`); shared with the pair search."""
    s = c.section(cfg, "search", defaults)
    c.choice(s["algorithm"], "search.algorithm", ALGORITHMS)
    c.integer(s["budget"], "search.budget", 1)
    c.integer(s["seed"], "search.seed", 0)
    objectives(s["objectives"], allowed, "search.objectives")
    s["params"] = algorithm_params(s["params"], algorithm_class(s["algorithm"]).PARAMS, "search.params")
    return s


def validate_search_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    from raynas.data import validate_data_config
    from raynas.hw.devices import get_device

    cfg = c.mapping(cfg, "config")
    c.check_known(cfg, DEFAULTS, "config")
    out: dict[str, Any] = {}
    # Locations are made absolute here: the config is stored with the run and read by other nodes.
    out["checkpoint"] = c.location(cfg.get("checkpoint"), "checkpoint", optional=True)
    out["run_dir"] = c.location(cfg.get("run_dir", DEFAULTS["run_dir"]), "run_dir")
    out["data"] = validate_data_config(cfg.get("data") or DEFAULTS["data"])

    ev = out["evaluator"] = c.section(cfg, "evaluator", DEFAULTS["evaluator"])
    for key in ("num_actors", "bn_samples", "batch_size", "threads"):
        c.integer(ev[key], f"evaluator.{key}", 1)
    if not isinstance(ev["device"], str) or not (ev["device"] == "cpu" or ev["device"].startswith("cuda")):
        c.fail("evaluator.device", f"{ev['device']!r} is not allowed", "cpu, cuda, cuda:N")

    lat = out["latency"] = latency_section(cfg, DEFAULTS["latency"], LATENCY_MODELS)
    # auto: on when the device is a node of its own (see raynas.search.runner._corrects)
    c.choice(lat["correction"], "latency.correction", CORRECTIONS)
    c.integer(lat["correction_per_generation"], "latency.correction_per_generation", 1)
    out["search"] = search_section(cfg, DEFAULTS["search"], OBJECTIVES)

    cons = out["constraints"] = c.section(cfg, "constraints", DEFAULTS["constraints"])
    c.number(cons["max_latency_ms"], "constraints.max_latency_ms", 0.0, low_open=True, optional=True)
    c.integer(cons["max_params"], "constraints.max_params", 1, optional=True)
    c.integer(cons["max_macs"], "constraints.max_macs", 1, optional=True)
    c.number(cons["max_energy_mj"], "constraints.max_energy_mj", 0.0, low_open=True, optional=True)
    if uses_energy(out):
        energy_device(lat)

    e = out["export"] = c.section(cfg, "export", DEFAULTS["export"])
    c.integer(e["top_k"], "export.top_k", 0)
    c.boolean(e["measure"], "export.measure")

    # The precision the board runs: the latency model's, the exports', and (quantized_accuracy) the accuracy's.
    d = out["deploy"] = deploy_section(cfg.get("deploy"))
    get_device(lat["device"], lat["devices_file"]).check_precision(d["precision"], "deploy.precision")
    return out
