"""The `raynas tune` configuration: a base training config plus the swept parameters, validated in full
before any trial starts. Errors are one line naming the field and what is allowed (exit code 2)."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

from raynas import config as c
from raynas import storage

DISTRIBUTIONS = {"uniform": 2, "loguniform": 2, "quniform": 3, "randint": 2, "choice": None}
DEFAULTS: dict[str, Any] = {
    "name": None,
    "storage_path": "~/raynas_runs/tune",  # a local path or a URI (s3://bucket/prefix, ...)
    "train": None,               # base training config: a YAML path (relative to this file) or a mapping
    "param_space": None,         # name -> {uniform|loguniform: [lo, hi]} | {quniform: [lo, hi, q]} | ...
    "num_samples": 8,
    "max_concurrent_trials": 1,
    "metric": "score",
    "mode": "max",
    "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
    "search_alg": {"name": "optuna", "seed": 0},
    # score = routed accuracy - cost_penalty * E[MACs] / MACs(big), E[MACs] = p MACs(little) + (1-p) MACs(big)
    "objective": {"cost_penalty": 0.1},
    # the pair each trial is judged on ('extreme' = largest big with smallest little, or a pair mapping)
    "evaluation": {"pair": "extreme", "bn_samples": 512},
    "trial_cpus": 0.5,           # the trial driver's share; its Ray Train worker takes scaling.cpus_per_worker
}


def apply_params(train_cfg: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The training config with swept values in place: a plain name is a strategy option
    (alpha, beta, gamma, temperature, tau, router_hidden, ...), a dotted one a config path (optimizer.lr)."""
    cfg = copy.deepcopy(dict(train_cfg))
    if isinstance(cfg.get("strategy"), str):
        cfg["strategy"] = {"name": cfg["strategy"]}
    c.apply_overrides(cfg, {key: value for key, value in params.items() if "." in key})
    cfg["strategy"].update({key: value for key, value in params.items() if "." not in key})
    return cfg


def _check_distribution(name: str, spec: Any) -> None:
    where = f"param_space.{name}"
    if not isinstance(spec, Mapping) or len(spec) != 1:
        c.fail(where, f"got {spec!r}", f"one of {{{', '.join(DISTRIBUTIONS)}}}: [...]")
    kind, args = next(iter(spec.items()))
    c.choice(kind, f"{where} distribution", DISTRIBUTIONS)
    if not isinstance(args, list) or not args:
        c.fail(f"{where}.{kind}", f"got {args!r}", "a non-empty list")
    if kind == "choice":
        return
    if len(args) != DISTRIBUTIONS[kind]:
        c.fail(f"{where}.{kind}", f"got {args!r}", f"{DISTRIBUTIONS[kind]} numbers")
    for i, arg in enumerate(args):
        c.number(arg, f"{where}.{kind}[{i}]", 0.0 if kind == "loguniform" else None, low_open=True)
    if not args[0] < args[1]:
        c.fail(f"{where}.{kind}", f"got {args!r}", "a lower bound below the upper bound")


def _corners(param_space: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each parameter's lowest and highest value (with the others at their lowest), to validate the
    training config every trial will get before any compute starts."""
    def value(spec: Mapping, end: int):
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            return args[0 if end == 0 else -1]
        if kind == "randint":
            return int(args[0] if end == 0 else args[1] - 1)
        return args[0] if end == 0 else args[1]

    low = {k: value(s, 0) for k, s in param_space.items()}
    return [low] + [{**low, k: value(s, 1)} for k, s in param_space.items()]


def _base_train_config(train: Any, base_dir: str | None) -> dict[str, Any]:
    """The base training config: a YAML path (relative to the tune config) or an inline mapping."""
    from raynas.train.config import load_train_config, validate_train_config

    if isinstance(train, str):
        location = train
        if base_dir is not None and not storage.is_uri(train) and not os.path.isabs(train):
            candidate = storage.join(base_dir, train)
            location = candidate if storage.is_file(candidate) else train
        train_cfg = load_train_config(location)
    elif isinstance(train, Mapping):
        train_cfg = c.nested("train", validate_train_config, train)
    else:
        c.fail("train", f"got {train!r}", "the path of a training config or a training config mapping")
    if train_cfg["strategy"]["name"] != "biglittle":
        c.fail("train.strategy.name", f"got {train_cfg['strategy']['name']!r}",
               "'biglittle' (the joint big/little loss)")
    return train_cfg


def validate_tune_config(cfg: Mapping[str, Any], base_dir: str | None = None) -> dict[str, Any]:
    from raynas.train.config import run_name, validate_train_config

    cfg = c.mapping(cfg, "config")
    c.check_known(cfg, DEFAULTS, "config")
    out = {k: copy.deepcopy(v) for k, v in DEFAULTS.items()}
    out.update({k: v for k, v in cfg.items() if not isinstance(DEFAULTS.get(k), dict)})
    c.string(run_name(out["name"]), "name")
    out["storage_path"] = c.location(out["storage_path"], "storage_path")
    train_cfg = _base_train_config(out["train"], base_dir)

    space = out["param_space"]
    if not isinstance(space, Mapping) or not space:
        c.fail("param_space", f"got {space!r}", "a mapping of swept parameters, e.g. alpha: {loguniform: [0.25, 4]}")
    for name, spec in space.items():
        _check_distribution(name, spec)
    out["param_space"] = dict(space)

    c.integer(out["num_samples"], "num_samples", 1)
    c.integer(out["max_concurrent_trials"], "max_concurrent_trials", 1)
    c.choice(out["metric"], "metric", ("score",))
    c.choice(out["mode"], "mode", ("max",))
    sched = out["scheduler"] = c.section(cfg, "scheduler", DEFAULTS["scheduler"])
    c.choice(sched["name"], "scheduler.name", ("asha", "fifo"))
    c.integer(sched["grace_period"], "scheduler.grace_period", 1, train_cfg["epochs"])
    c.integer(sched["reduction_factor"], "scheduler.reduction_factor", 2)
    alg = out["search_alg"] = c.section(cfg, "search_alg", DEFAULTS["search_alg"])
    c.choice(alg["name"], "search_alg.name", ("optuna",))
    c.integer(alg["seed"], "search_alg.seed", 0)
    obj = out["objective"] = c.section(cfg, "objective", DEFAULTS["objective"])
    c.number(obj["cost_penalty"], "objective.cost_penalty", 0.0)
    ev = out["evaluation"] = c.section(cfg, "evaluation", DEFAULTS["evaluation"])
    if ev["pair"] != "extreme":
        c.mapping(ev["pair"], "evaluation.pair")
    c.integer(ev["bn_samples"], "evaluation.bn_samples", 1)
    c.number(out["trial_cpus"], "trial_cpus", 0.0, low_open=True)

    train_cfg["strategy"]["score_cost_penalty"] = float(obj["cost_penalty"])
    for corner in _corners(out["param_space"]):  # every trial's training config is valid
        validate_train_config(apply_params(train_cfg, corner), check_files=False)
    out["train"] = train_cfg
    return out


def load_tune_config(path: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    location = storage.normalize(path)
    cfg = c.apply_overrides(c.read_yaml(location), overrides)
    cfg.setdefault("name", storage.basename(location).rsplit(".", 1)[0])
    return validate_tune_config(cfg, base_dir=storage.parent(location))
