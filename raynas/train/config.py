"""The training config: one YAML file, validated in full before any compute starts.

Every error is a `ConfigError` whose one-line message names the field (`optimizer.lr: ...`) and
what is allowed; the CLI prints it and exits 2. The checks themselves live in raynas.config.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

from raynas import config as c
from raynas import storage

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


def run_name(value: Any, field: str = "name") -> str | None:
    """A run name: a directory under the storage path, so no '/'."""
    if value is not None and (not isinstance(value, str) or not value.strip() or "/" in value):
        c.fail(field, f"got {value!r}", "a run name without '/'")
    return value


def _strategy_section(value: Any, epochs: int) -> dict[str, Any]:
    """`strategy: sandwich` or `strategy: {name: sandwich, num_random: 2}` -> validated options."""
    from raynas.train.strategies import get_strategy_class

    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping) or not isinstance(value.get("name"), str):
        c.fail("strategy", f"got {value!r}", "a strategy name or a mapping with 'name'")
    cls = get_strategy_class(value["name"])
    options = cls.validate_options({k: v for k, v in value.items() if k != "name"}, where="strategy")
    cls.check_epochs(options, epochs, where="strategy")  # e.g. progressive shrinking's phases fill the run
    return {"name": value["name"], **options}


def _optimizer(cfg: Mapping[str, Any]) -> dict[str, Any]:
    opt = c.section(cfg, "optimizer", SECTIONS["optimizer"])
    c.choice(opt["name"], "optimizer.name", OPTIMIZERS)
    c.number(opt["lr"], "optimizer.lr", 0.0, 10.0, low_open=True)
    c.number(opt["momentum"], "optimizer.momentum", 0.0, 1.0, high_open=True)
    c.boolean(opt["nesterov"], "optimizer.nesterov")
    c.number(opt["weight_decay"], "optimizer.weight_decay", 0.0, 1.0)
    c.boolean(opt["decay_norm_and_bias"], "optimizer.decay_norm_and_bias")
    c.number(opt["grad_clip"], "optimizer.grad_clip", 0.0, 1e6, optional=True, low_open=True)
    betas = opt["betas"]
    if not isinstance(betas, list) or len(betas) != 2:
        c.fail("optimizer.betas", f"got {betas!r}", "two numbers in [0, 1)")
    for i, beta in enumerate(betas):
        c.number(beta, f"optimizer.betas[{i}]", 0.0, 1.0, high_open=True)
    if opt["name"] == "sgd" and opt["nesterov"] and opt["momentum"] == 0:
        c.fail("optimizer.nesterov", "needs optimizer.momentum > 0", "false, or a momentum > 0")
    return opt


def validate_train_config(cfg: Mapping[str, Any], *, check_files: bool = True) -> dict[str, Any]:
    """Return the config with every default filled in, or raise `ConfigError` naming the field."""
    from raynas.data import validate_data_config

    cfg = c.mapping(cfg, "config")
    c.check_known(cfg, TOP_LEVEL, "")
    for key, default in TOP_LEVEL.items():
        if default is REQUIRED and cfg.get(key) is None:
            c.fail(key, "missing")
    out: dict[str, Any] = {k: copy.deepcopy(v) for k, v in TOP_LEVEL.items() if v is not REQUIRED}
    out.update({k: v for k, v in cfg.items() if k not in SECTIONS})

    run_name(out["name"])
    # A location every node and later run can use: an absolute local path, or the URI as given.
    out["storage_path"] = c.location(out["storage_path"], "storage_path")
    if not isinstance(out["space"], str):
        c.fail("space", f"got {out['space']!r}", "a built-in space name or a .yaml path")
    c.integer(out["resolution"], "resolution", 8, optional=True)
    out["supernet"] = c.mapping(out["supernet"], "supernet")
    c.integer(out["epochs"], "epochs", 1)
    c.integer(out["steps_per_epoch"], "steps_per_epoch", 1, optional=True)
    c.number(out["label_smoothing"], "label_smoothing", 0.0, 1.0, high_open=True)
    c.choice(out["precision"], "precision", PRECISIONS)
    c.integer(out["seed"], "seed", 0)
    c.integer(out["log_every"], "log_every", 0)
    out["data"] = validate_data_config(out["data"], check_files=check_files)
    out["strategy"] = _strategy_section(out["strategy"], out["epochs"])
    out["optimizer"] = _optimizer(cfg)

    sched = out["scheduler"] = c.section(cfg, "scheduler", SECTIONS["scheduler"])
    c.choice(sched["name"], "scheduler.name", SCHEDULERS)
    c.number(sched["warmup_epochs"], "scheduler.warmup_epochs", 0.0, float(out["epochs"]))
    c.number(sched["min_lr_ratio"], "scheduler.min_lr_ratio", 0.0, 1.0)

    ev = out["eval"] = c.section(cfg, "eval", SECTIONS["eval"])
    c.integer(ev["bn_samples"], "eval.bn_samples", 1)
    c.integer(ev["num_random"], "eval.num_random", 0)
    c.integer(ev["every"], "eval.every", 0)
    c.integer(ev["seed"], "eval.seed", 0)

    sc = out["scaling"] = c.section(cfg, "scaling", SECTIONS["scaling"])
    c.integer(sc["num_workers"], "scaling.num_workers", 1)
    c.boolean(sc["use_gpu"], "scaling.use_gpu")
    c.number(sc["cpus_per_worker"], "scaling.cpus_per_worker", 0.0, 1024.0, low_open=True)

    out["failure"] = c.section(cfg, "failure", SECTIONS["failure"])
    c.integer(out["failure"]["max_failures"], "failure.max_failures", -1)
    out["checkpoint"] = c.section(cfg, "checkpoint", SECTIONS["checkpoint"])
    c.integer(out["checkpoint"]["num_to_keep"], "checkpoint.num_to_keep", 1)
    return out


def _space_next_to_config(cfg: dict[str, Any], config_location: str) -> None:
    """A relative space path is relative to the config file, so configs can ship next to their spaces."""
    space = cfg.get("space")
    if isinstance(space, str) and space.endswith((".yaml", ".yml")) and not storage.is_uri(space) \
            and not os.path.isabs(space):
        candidate = storage.join(storage.parent(config_location), space)
        if storage.is_file(candidate):
            cfg["space"] = candidate


def load_train_config(path: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML config, apply command-line overrides (dotted keys), validate, resolve the space.

    Overrides use dotted keys, e.g. {"scaling.num_workers": 2, "name": "run1"}.
    """
    location = storage.normalize(path)
    cfg = c.apply_overrides(c.read_yaml(location), overrides)
    if cfg.get("name") is None:
        cfg["name"] = storage.basename(location).rsplit(".", 1)[0]
    _space_next_to_config(cfg, location)
    return validate_train_config(cfg)
