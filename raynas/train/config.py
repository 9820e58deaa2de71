"""The training config: one YAML file, validated in full before any compute starts.

Every error is a `ConfigError` whose one-line message names the field (`optimizer.lr: ...`) and
what is allowed; the CLI prints it and exits 2.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from raynas import storage
from raynas.errors import ConfigError

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "constant")

# section -> {key: default}; a default of REQUIRED must be given by the user.
REQUIRED = object()
SECTIONS: dict[str, dict[str, Any]] = {
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 4e-5,
                  "betas": [0.9, 0.999], "decay_norm_and_bias": False, "grad_clip": None},
    "scheduler": {"name": "cosine", "warmup_epochs": 0.0, "min_lr_ratio": 0.0},
    # every: measure subnets every N epochs and after the last one (0: never)
    "eval": {"bn_samples": 2048, "num_random": 1, "every": 1, "seed": 0},
    "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1},
    "failure": {"max_failures": 0},
    "checkpoint": {"num_to_keep": 2},
}
TOP_LEVEL: dict[str, Any] = {
    "name": None,                 # run name; default: the config file's stem
    "storage_path": "~/raynas_runs",  # a local path or a URI (s3://bucket/prefix, gs://..., file://...)
    "space": REQUIRED,            # built-in space name or a space YAML path
    "resolution": None,           # override of the space's input resolution
    "supernet": {},               # keyword arguments of build_supernet (family specific)
    "data": {},
    "strategy": "uniform",        # a name, or a mapping {name: ..., <strategy options>}
    "epochs": REQUIRED,
    "steps_per_epoch": None,      # cap on optimizer steps per epoch (tiny runs)
    "label_smoothing": 0.1,
    "precision": "auto",          # auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU
    "seed": 0,
    "log_every": 0,               # also print a progress line every N steps (0: once per epoch)
    **{section: {} for section in SECTIONS},
}


def _fail(field: str, message: str) -> None:
    raise ConfigError(f"{field}: {message}")


def _int(value: Any, field: str, minimum: int, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _fail(field, f"expected an integer >= {minimum}, got {value!r}")
    return value


def _number(value: Any, field: str, low: float, high: float, optional: bool = False,
            low_open: bool = False, high_open: bool = False) -> float | None:
    if value is None and optional:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        _fail(field, f"expected a number in {bounds}, got {value!r}")
    return float(value)


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        _fail(field, f"expected true or false, got {value!r}")
    return value


def _choice(value: Any, field: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        _fail(field, f"{value!r} is not allowed; allowed: {list(allowed)}")
    return value


def _section(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    given = cfg.get(name) or {}
    if not isinstance(given, Mapping):
        _fail(name, f"expected a mapping, got {given!r}")
    defaults = SECTIONS[name]
    for key in given:
        if key not in defaults:
            _fail(name, f"unknown field '{key}'; allowed: {sorted(defaults)}")
    return {**copy.deepcopy(defaults), **dict(given)}


def _strategy_section(value: Any) -> dict[str, Any]:
    """`strategy: sandwich` or `strategy: {name: sandwich, num_random: 2}` -> validated options."""
    from raynas.train.strategies import get_strategy_class

    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping) or not isinstance(value.get("name"), str):
        _fail("strategy", f"expected a strategy name or a mapping with 'name', got {value!r}")
    cls = get_strategy_class(value["name"])
    options = cls.validate_options({k: v for k, v in value.items() if k != "name"}, where="strategy")
    return {"name": value["name"], **options}


def validate_train_config(cfg: Mapping[str, Any], *, check_files: bool = True) -> dict[str, Any]:
    """Return the config with every default filled in, or raise `ConfigError` naming the field."""
    from raynas.data import validate_data_config

    if not isinstance(cfg, Mapping):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(cfg).__name__}")
    for key in cfg:
        if key not in TOP_LEVEL:
            _fail(str(key), f"unknown field; allowed: {sorted(TOP_LEVEL)}")
    for key, default in TOP_LEVEL.items():
        if default is REQUIRED and cfg.get(key) is None:
            _fail(key, "missing")
    out: dict[str, Any] = {k: copy.deepcopy(v) for k, v in TOP_LEVEL.items() if v is not REQUIRED}
    out.update({k: v for k, v in cfg.items() if k not in SECTIONS})

    if out["name"] is not None and (not isinstance(out["name"], str) or not out["name"].strip()
                                    or "/" in out["name"]):
        _fail("name", f"expected a run name without '/', got {out['name']!r}")
    if not isinstance(out["storage_path"], str) or not out["storage_path"]:
        _fail("storage_path", f"expected a directory path or a URI such as s3://bucket/runs, "
                              f"got {out['storage_path']!r}")
    # A location every node and later run can use: an absolute local path, or the URI as given.
    out["storage_path"] = storage.normalize(out["storage_path"])
    if not isinstance(out["space"], str):
        _fail("space", f"expected a built-in space name or a .yaml path, got {out['space']!r}")
    _int(out["resolution"], "resolution", 8, optional=True)
    if not isinstance(out["supernet"], Mapping):
        _fail("supernet", f"expected a mapping of build_supernet options, got {out['supernet']!r}")
    out["supernet"] = dict(out["supernet"])
    _int(out["epochs"], "epochs", 1)
    _int(out["steps_per_epoch"], "steps_per_epoch", 1, optional=True)
    _number(out["label_smoothing"], "label_smoothing", 0.0, 1.0, high_open=True)
    _choice(out["precision"], "precision", PRECISIONS)
    _int(out["seed"], "seed", 0)
    _int(out["log_every"], "log_every", 0)
    out["data"] = validate_data_config(out["data"], check_files=check_files)
    out["strategy"] = _strategy_section(out["strategy"])

    opt = out["optimizer"] = _section(cfg, "optimizer")
    _choice(opt["name"], "optimizer.name", OPTIMIZERS)
    _number(opt["lr"], "optimizer.lr", 0.0, 10.0, low_open=True)
    _number(opt["momentum"], "optimizer.momentum", 0.0, 1.0, high_open=True)
    _bool(opt["nesterov"], "optimizer.nesterov")
    _number(opt["weight_decay"], "optimizer.weight_decay", 0.0, 1.0)
    _bool(opt["decay_norm_and_bias"], "optimizer.decay_norm_and_bias")
    _number(opt["grad_clip"], "optimizer.grad_clip", 0.0, 1e6, optional=True, low_open=True)
    betas = opt["betas"]
    if not (isinstance(betas, list) and len(betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        _fail("optimizer.betas", f"expected two numbers in [0, 1), got {betas!r}")
    if opt["name"] == "sgd" and opt["nesterov"] and opt["momentum"] == 0:
        _fail("optimizer.nesterov", "needs optimizer.momentum > 0")

    sched = out["scheduler"] = _section(cfg, "scheduler")
    _choice(sched["name"], "scheduler.name", SCHEDULERS)
    _number(sched["warmup_epochs"], "scheduler.warmup_epochs", 0.0, float(out["epochs"]))
    _number(sched["min_lr_ratio"], "scheduler.min_lr_ratio", 0.0, 1.0)

    ev = out["eval"] = _section(cfg, "eval")
    _int(ev["bn_samples"], "eval.bn_samples", 1)
    _int(ev["num_random"], "eval.num_random", 0)
    _int(ev["every"], "eval.every", 0)
    _int(ev["seed"], "eval.seed", 0)

    sc = out["scaling"] = _section(cfg, "scaling")
    _int(sc["num_workers"], "scaling.num_workers", 1)
    _bool(sc["use_gpu"], "scaling.use_gpu")
    _number(sc["cpus_per_worker"], "scaling.cpus_per_worker", 0.0, 1024.0, low_open=True)

    out["failure"] = _section(cfg, "failure")
    _int(out["failure"]["max_failures"], "failure.max_failures", -1)
    out["checkpoint"] = _section(cfg, "checkpoint")
    _int(out["checkpoint"]["num_to_keep"], "checkpoint.num_to_keep", 1)
    return out


def load_train_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML config, apply command-line overrides (dotted keys), validate, resolve the space.

    Overrides use dotted keys, e.g. {"scaling.num_workers": 2, "name": "run1"}.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: file {path} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"config: {path} is not valid YAML"
                          + (f" (line {mark.line + 1})" if mark is not None else "")) from None
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"config: {path} must hold a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = cfg
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{part}: expected a mapping, got {node!r}")
        node[leaf] = value
    if cfg.get("name") is None:
        cfg["name"] = path.stem
    # A space path is relative to the config file, so configs can ship next to their spaces.
    space = cfg.get("space")
    if isinstance(space, str) and space.endswith((".yaml", ".yml")) and not Path(space).is_absolute():
        candidate = path.parent / space
        if candidate.is_file():
            cfg["space"] = str(candidate.resolve())
    return validate_train_config(cfg)
