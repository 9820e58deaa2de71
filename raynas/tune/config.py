"""The `raynas tune` configuration: a base training config plus the swept parameters, validated in full
before any trial starts. Errors are one line naming the field and what is allowed (exit code 2)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from raynas import storage
from raynas.config_utils import check_known, one_of, positive_float, positive_int, read_yaml, section
from raynas.errors import ConfigError

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


def _set_dotted(cfg: dict, dotted: str, value: Any) -> None:
    node = cfg
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"param_space.{dotted}: '{part}' is not a section of the training config")
    node[leaf] = value


def apply_params(train_cfg: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The training config with swept values in place: a plain name is a strategy option
    (alpha, beta, gamma, temperature, tau, router_hidden, ...), a dotted one a config path (optimizer.lr)."""
    cfg = copy.deepcopy(dict(train_cfg))
    if isinstance(cfg.get("strategy"), str):
        cfg["strategy"] = {"name": cfg["strategy"]}
    for key, value in params.items():
        if "." in key:
            _set_dotted(cfg, key, value)
        else:
            cfg["strategy"][key] = value
    return cfg


def _check_distribution(name: str, spec: Any) -> None:
    where = f"param_space.{name}"
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(f"{where}: expected one of {{{', '.join(DISTRIBUTIONS)}}}: [...], got {spec!r}")
    kind, args = next(iter(spec.items()))
    one_of(kind, DISTRIBUTIONS, f"{where} distribution")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}.{kind}: expected a list, got {args!r}")
    if kind == "choice":
        return
    if len(args) != DISTRIBUTIONS[kind] or not all(isinstance(a, (int, float)) and not isinstance(a, bool)
                                                   for a in args):
        raise ConfigError(f"{where}.{kind}: expected {DISTRIBUTIONS[kind]} numbers, got {args!r}")
    if not args[0] < args[1]:
        raise ConfigError(f"{where}.{kind}: lower bound must be below the upper bound, got {args!r}")
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"{where}.loguniform: bounds must be > 0, got {args!r}")


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


def validate_tune_config(cfg: Mapping[str, Any], base_dir: Path | None = None) -> dict[str, Any]:
    from raynas.train.config import load_train_config, validate_train_config

    check_known(cfg, DEFAULTS, "config")
    out = {k: copy.deepcopy(v) for k, v in DEFAULTS.items()}
    out.update({k: v for k, v in cfg.items() if not isinstance(DEFAULTS.get(k), dict)})
    if not isinstance(out["name"], str) or not out["name"] or "/" in out["name"]:
        raise ConfigError(f"name: expected a run name without '/', got {out['name']!r}")
    if not isinstance(out["storage_path"], str) or not out["storage_path"]:
        raise ConfigError(f"storage_path: expected a directory path or a URI such as s3://bucket/tune, "
                          f"got {out['storage_path']!r}")
    out["storage_path"] = storage.normalize(out["storage_path"])

    train = out["train"]
    if isinstance(train, str):
        path = Path(train)
        if not path.is_absolute() and base_dir is not None and (base_dir / path).is_file():
            path = base_dir / path
        train_cfg = load_train_config(path)
    elif isinstance(train, Mapping):
        train_cfg = validate_train_config(train)
    else:
        raise ConfigError("train: expected the path of a training config or a training config mapping")
    if train_cfg["strategy"]["name"] != "biglittle":
        raise ConfigError(f"train.strategy.name: expected 'biglittle' (the joint big/little loss), "
                          f"got {train_cfg['strategy']['name']!r}")

    space = out["param_space"]
    if not isinstance(space, Mapping) or not space:
        raise ConfigError("param_space: expected a mapping of swept parameters, e.g. alpha: {loguniform: [0.25, 4]}")
    for name, spec in space.items():
        _check_distribution(name, spec)
    out["param_space"] = dict(space)

    positive_int(out["num_samples"], "num_samples")
    positive_int(out["max_concurrent_trials"], "max_concurrent_trials")
    one_of(out["metric"], ("score",), "metric")
    one_of(out["mode"], ("max",), "mode")
    sched = out["scheduler"] = section(cfg, "scheduler", DEFAULTS["scheduler"])
    one_of(sched["name"], ("asha", "fifo"), "scheduler.name")
    positive_int(sched["grace_period"], "scheduler.grace_period")
    positive_int(sched["reduction_factor"], "scheduler.reduction_factor", minimum=2)
    if sched["grace_period"] > train_cfg["epochs"]:
        raise ConfigError(f"scheduler.grace_period: {sched['grace_period']} exceeds the {train_cfg['epochs']} "
                          "training epochs")
    alg = out["search_alg"] = section(cfg, "search_alg", DEFAULTS["search_alg"])
    one_of(alg["name"], ("optuna",), "search_alg.name")
    positive_int(alg["seed"], "search_alg.seed", minimum=0)
    obj = out["objective"] = section(cfg, "objective", DEFAULTS["objective"])
    if not (isinstance(obj["cost_penalty"], (int, float)) and obj["cost_penalty"] >= 0):
        raise ConfigError(f"objective.cost_penalty: expected a number >= 0, got {obj['cost_penalty']!r}")
    ev = out["evaluation"] = section(cfg, "evaluation", DEFAULTS["evaluation"])
    if ev["pair"] != "extreme" and not isinstance(ev["pair"], Mapping):
        raise ConfigError(f"evaluation.pair: expected 'extreme' or a pair mapping, got {ev['pair']!r}")
    positive_int(ev["bn_samples"], "evaluation.bn_samples")
    positive_float(out["trial_cpus"], "trial_cpus")

    train_cfg["strategy"]["score_cost_penalty"] = float(obj["cost_penalty"])
    for corner in _corners(out["param_space"]):  # every trial's training config is valid
        validate_train_config(apply_params(train_cfg, corner), check_files=False)
    out["train"] = train_cfg
    return out


def load_tune_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    path = Path(path)
    cfg = read_yaml(path)
    for key, value in (overrides or {}).items():
        if value is not None:
            cfg[key] = value
    cfg.setdefault("name", path.stem)
    return validate_tune_config(cfg, base_dir=path.parent)
