"""Size-specific supernets with weight inheritance (seed 001, AutoViT §3.2 and §5.2).

AutoViT splits its search space by model size into independent supernets (XXS, XS, S) so small
and large subnets do not fight over shared weights, and lets the smaller supernets start from the
larger one: every tensor of the smaller supernet receives the overlapping slice of the trained
larger one (`raynas.supernets.autovit.inherit_weights`). The chain is: train `autovit-s`,
initialise `autovit-xs` and `autovit-xxs` from it, train each.

`train_size_specific(cfg)` runs such a chain, one `raynas train` run per stage (so each stage gets
Ray Train, checkpoints, resume and metrics as any run). A stage that inherits gets the
`InheritStrategy` wrapper: in every worker it copies the source stage's trained weights into the
freshly built supernet, then hands everything else to the stage's own strategy. Re-running a chain
skips finished stages and resumes an interrupted one.

Chain config (`pipelines/configs/train_autovit_sizes.yaml`):
    name: autovit_sizes            # stage runs go to <storage_path>/<name>/<stage>
    storage_path: ~/raynas_runs
    train: {...}                   # `raynas train` keys shared by all stages (not name / space / storage_path)
    stages:
      - space: autovit-s           # built-in name or YAML path; `name:` defaults to the space's name
      - {space: autovit-xs, inherit_from: autovit-s, train: {...per-stage overrides...}}
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raynas import storage
from raynas.errors import ConfigError, UserError
from raynas.space import SearchSpace
from raynas.space.loader import family_module
from raynas.train.strategies import build_strategy, get_strategy_class, load_plugins, register_strategy
from raynas.train.strategies.base import Strategy

CHAIN_KEYS = ("name", "storage_path", "train", "stages")
STAGE_KEYS = ("space", "name", "inherit_from", "train")
RESERVED_TRAIN_KEYS = ("name", "space", "storage_path")
CHAIN_FILE = "chain.json"
INHERIT_STRATEGY = "inherit"


# ---- inheritance of weights ------------------------------------------------------------------------
def inherit_function(family: str, where: str = "inherit_from"):
    fn = getattr(family_module(family), "inherit_weights", None)
    if fn is None:
        raise ConfigError(f"{where}: family '{family}' has no weight inheritance (inherit_weights); "
                          f"allowed: families that define it, e.g. autovit")
    return fn


def inherit_from_checkpoint(dst, path: str | os.PathLike, where: str = "strategy.init_from") -> dict[str, Any]:
    """Copy the overlapping weights of a saved supernet (`raynas train` output; a local path or URI) into `dst`."""
    from raynas.supernets.checkpoint import load_supernet

    if not storage.is_file(path):
        raise ConfigError(f"{where}: file {storage.display(path)} does not exist")
    src = load_supernet(path)
    if src.space.family != dst.space.family:
        raise ConfigError(f"{where}: {storage.display(path)} is a '{src.space.family}' supernet; '{dst.space.name}' is "
                          f"'{dst.space.family}'")
    return inherit_function(dst.space.family, where)(src, dst)


def _normalise_base(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        value = "uniform"
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping) or not isinstance(value.get("name"), str):
        raise ConfigError(f"{where}: expected a strategy name or a mapping with 'name', got {value!r}")
    cls = get_strategy_class(value["name"])
    if cls is InheritStrategy or value["name"] == "mole":
        raise ConfigError(f"{where}.name: '{value['name']}' cannot follow inheritance (it loads its own weights)")
    options = cls.validate_options({k: v for k, v in value.items() if k != "name"}, where=where)
    return {"name": value["name"], **options}


@register_strategy
class InheritStrategy(Strategy):
    """Initialise the supernet from a larger trained one, then train with the `base` strategy.

    Selected as `strategy: {name: inherit, init_from: LOCATION, base: ...}` (a local path or URI);
    `train_size_specific` writes this for every inheriting stage. On resume the run's checkpoint
    replaces the inherited weights, as it should.
    """

    name = "inherit"
    DEFAULTS = {"init_from": None, "base": None}

    @classmethod
    def check(cls, options: dict[str, Any], where: str) -> None:
        if not isinstance(options["init_from"], str) or not options["init_from"]:
            raise ConfigError(f"{where}.init_from: expected the path of the larger trained supernet, "
                              f"got {options['init_from']!r}")
        # Absolute (or a URI): every worker reads it, whatever its working directory.
        options["init_from"] = storage.normalize(options["init_from"])
        options["base"] = _normalise_base(options["base"], f"{where}.base")

    @classmethod
    def check_space(cls, space: SearchSpace) -> None:
        inherit_function(space.family, "strategy")

    def __init__(self, space: SearchSpace, options: Mapping[str, Any], seed: int):
        super().__init__(space, options, seed)
        self.inner = build_strategy(self.options["base"], space, seed)
        self.name = f"{self.inner.name}+inherit"  # what metrics and checkpoint metadata record
        self.inherit_report: dict[str, Any] | None = None

    def prepare_model(self, supernet):
        self.inherit_report = inherit_from_checkpoint(supernet, self.options["init_from"])
        return self.inner.prepare_model(supernet)

    def configure_optimizers(self, model, make_optimizer):
        return self.inner.configure_optimizers(model, make_optimizer)

    def export_supernet(self, model):
        return self.inner.export_supernet(model)

    def teacher_arch(self):
        return self.inner.teacher_arch()

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        self.inner.on_epoch_start(epoch, num_epochs)

    def train_step(self, x, y, ctx):
        return self.inner.train_step(x, y, ctx)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)


# ---- the chain ------------------------------------------------------------------------------------
@dataclass
class Stage:
    key: str                      # the stage's name, referenced by `inherit_from`
    cfg: dict[str, Any]           # validated `raynas train` config (with the stage's own strategy)
    space: SearchSpace
    inherit_from: str | None
    run_dir: str                  # location (local path or URI) of the stage's run
    done: bool                    # all epochs already trained (a re-run skips it)
    shared_fraction: float | None = None  # of the stage's weights, the part inherited (dry run)


@dataclass
class StageResult:
    key: str
    run_dir: str                  # locations: local paths or URIs
    supernet_path: str
    inherited_from: str | None
    skipped: bool
    metrics: Any = field(repr=False, default=None)


def _deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return dict(value)


def plan_size_specific(cfg: Mapping[str, Any]) -> list[Stage]:
    """Validate the whole chain before any compute: every stage's training config, the stage
    references, and that each inheritance is possible (a dry run on freshly built supernets)."""
    from raynas.space import load_space
    from raynas.supernets import build_supernet
    from raynas.train.trainer import SUPERNET_FILE, plan_run

    if not isinstance(cfg, Mapping):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(cfg).__name__}")
    for key in cfg:
        if key not in CHAIN_KEYS:
            raise ConfigError(f"{key}: unknown field; allowed: {list(CHAIN_KEYS)}")
    name = cfg.get("name")
    if not isinstance(name, str) or not name.strip() or "/" in name:
        raise ConfigError(f"name: expected a chain name without '/', got {name!r}")
    storage_path = cfg.get("storage_path", "~/raynas_runs")
    if not isinstance(storage_path, str) or not storage_path:
        raise ConfigError(f"storage_path: expected a directory path or URI, got {storage_path!r}")
    chain_dir = storage.join(storage.normalize(storage_path), name)
    shared = _mapping(cfg.get("train"), "train")
    for key in RESERVED_TRAIN_KEYS:
        if key in shared:
            raise ConfigError(f"train.{key}: set per stage ('stages[].space' / 'stages[].name') or at the top level")
    stages_cfg = cfg.get("stages")
    if not isinstance(stages_cfg, list) or not stages_cfg:
        raise ConfigError("stages: expected a non-empty list of {space, inherit_from?, name?, train?}")

    stages: list[Stage] = []
    supernets: dict[str, Any] = {}
    for i, raw in enumerate(stages_cfg):
        where = f"stages[{i}]"
        if isinstance(raw, str):
            raw = {"space": raw}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: expected a mapping with 'space', got {raw!r}")
        for key in raw:
            if key not in STAGE_KEYS:
                raise ConfigError(f"{where}: unknown field '{key}'; allowed: {list(STAGE_KEYS)}")
        if not isinstance(raw.get("space"), str):
            raise ConfigError(f"{where}.space: expected a built-in space name or a .yaml path, "
                              f"got {raw.get('space')!r}")
        overrides = _mapping(raw.get("train"), f"{where}.train")
        for key in RESERVED_TRAIN_KEYS:
            if key in overrides:
                raise ConfigError(f"{where}.train.{key}: not allowed here; use {where}.space / {where}.name")
        try:
            key = raw.get("name") or load_space(raw["space"]).name
        except UserError as exc:
            raise ConfigError(f"{where}.space: {exc}") from None
        if not isinstance(key, str) or "/" in key or not key.strip():
            raise ConfigError(f"{where}.name: expected a stage name without '/', got {key!r}")
        if any(s.key == key for s in stages):
            raise ConfigError(f"{where}.name: stage '{key}' appears twice; give one of them a `name`")
        train_cfg = _deep_merge(shared, overrides)
        train_cfg.update(space=raw["space"], storage_path=chain_dir, name=key)
        try:
            plan = plan_run(train_cfg)
        except UserError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        source = raw.get("inherit_from")
        shared_fraction = None
        if source is not None:
            earlier = [s.key for s in stages]
            if source not in earlier:
                raise ConfigError(f"{where}.inherit_from: '{source}' is not an earlier stage; allowed: {earlier}")
            src_stage = next(s for s in stages if s.key == source)
            if src_stage.space.family != plan.space.family:
                raise ConfigError(f"{where}.inherit_from: stage '{source}' is '{src_stage.space.family}', "
                                  f"this stage '{plan.space.family}'")
            if plan.cfg["strategy"]["name"] == "mole":
                raise ConfigError(f"{where}.train.strategy: 'mole' loads its own weights; it cannot inherit")
            dst = build_supernet(plan.space, **plan.cfg["supernet"])
            try:
                report = inherit_function(plan.space.family, f"{where}.inherit_from")(supernets[source], dst)
            except UserError as exc:
                raise ConfigError(f"{where}.inherit_from: {exc}") from None
            total = sum(t.numel() for t in dst.state_dict().values())
            shared_fraction = report["elements"] / max(total, 1)
        supernets[key] = build_supernet(plan.space, **plan.cfg["supernet"])
        done = plan.resume_epoch >= plan.cfg["epochs"] and storage.is_file(storage.join(plan.run_dir, SUPERNET_FILE))
        stages.append(Stage(key, plan.cfg, plan.space, source, plan.run_dir, done, shared_fraction))
    return stages


def _stage_config(stage: Stage, inherit_path: str | None) -> dict[str, Any]:
    cfg = copy.deepcopy(stage.cfg)
    if inherit_path is not None:
        cfg["strategy"] = {"name": INHERIT_STRATEGY, "init_from": inherit_path, "base": cfg["strategy"]}
    return cfg


def train_size_specific(cfg: Mapping[str, Any], *, quiet: bool = False,
                        plugins: Sequence[str] = ()) -> list[StageResult]:
    """Train the chain's stages in order; inheriting stages start from their source's trained weights.

    Writes `<storage_path>/<name>/chain.json` (stages, run directories, inheritance, last metrics);
    `storage_path` is a local path or a URI. `plugins`: strategy modules named on the command line.
    """
    from raynas.train.metrics import read_metrics
    from raynas.train.trainer import SUPERNET_FILE, train

    load_plugins(plugins)
    stages = plan_size_specific(cfg)
    chain_dir = storage.parent(stages[0].run_dir)
    results: dict[str, StageResult] = {}
    for stage in stages:
        source = results[stage.inherit_from].supernet_path if stage.inherit_from else None
        if stage.done:
            if not quiet:
                print(f"raynas train-sizes: stage '{stage.key}' already trained ({storage.display(stage.run_dir)}); "
                      "skipped", file=sys.stderr, flush=True)
            result = StageResult(stage.key, stage.run_dir, storage.join(stage.run_dir, SUPERNET_FILE), source, True)
        else:
            if not quiet and source is not None:
                print(f"raynas train-sizes: stage '{stage.key}' inherits {100 * stage.shared_fraction:.1f}% of its "
                      f"weights from '{stage.inherit_from}' ({storage.display(source)})", file=sys.stderr, flush=True)
            trained = train(_stage_config(stage, source), quiet=quiet, plugins=plugins)
            result = StageResult(stage.key, trained.run_dir, trained.supernet_path, source, False)
        result.metrics = read_metrics(result.run_dir)
        results[stage.key] = result
    summary = []
    for stage in stages:
        r = results[stage.key]
        last = r.metrics.sort_values("epoch").iloc[-1].to_dict() if len(r.metrics) else {}
        summary.append({"stage": stage.key, "space": stage.space.name, "run_dir": r.run_dir,
                        "supernet": r.supernet_path, "inherit_from": stage.inherit_from,
                        "inherited_fraction": stage.shared_fraction, "skipped": r.skipped,
                        "last_epoch": {k: v for k, v in last.items() if isinstance(v, (int, float, str))}})
    storage.write_text(storage.join(chain_dir, CHAIN_FILE), json.dumps(summary, indent=2, default=float))
    return [results[s.key] for s in stages]


# ---- config file and command line ------------------------------------------------------------------
def load_chain_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a chain YAML; overrides use dotted keys ({"train.scaling.num_workers": 2, "name": "x"}).
    Stage spaces given as relative .yaml paths are relative to the config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: file {path} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise ConfigError(f"config: {path} is not valid YAML") from None
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
    cfg.setdefault("name", path.stem)
    for stage in cfg.get("stages") or []:
        space = stage.get("space") if isinstance(stage, dict) else None
        if isinstance(space, str) and space.endswith((".yaml", ".yml")) and not Path(space).is_absolute():
            candidate = path.parent / space
            if candidate.is_file():
                stage["space"] = str(candidate.resolve())
    return cfg


def add_arguments(parser: argparse.ArgumentParser, config_flag: bool = False) -> None:
    if config_flag:
        parser.add_argument("--config", required=True, help="size-specific chain YAML")
    else:
        parser.add_argument("config", help="size-specific chain YAML (see pipelines/configs/train_autovit_sizes.yaml)")
    parser.add_argument("--name", help="chain name (stage runs go to <storage>/<name>/<stage>); re-running resumes")
    parser.add_argument("--storage", help="directory or URI (s3://bucket/prefix) holding runs (overrides storage_path)")
    parser.add_argument("--num-workers", type=int, help="Ray Train workers per stage")
    parser.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker")
    parser.add_argument("--epochs", type=int, help="epochs of every stage (overrides train.epochs)")
    from raynas.train.cli import add_plugin_argument

    add_plugin_argument(parser)


def cmd_train_sizes(args: argparse.Namespace) -> int:
    load_plugins(args.plugin)
    cfg = load_chain_config(args.config, {"name": args.name, "storage_path": args.storage,
                                          "train.scaling.num_workers": args.num_workers,
                                          "train.scaling.use_gpu": args.use_gpu, "train.epochs": args.epochs})
    results = train_size_specific(cfg, plugins=args.plugin)
    print(json.dumps({r.key: {"run_dir": r.run_dir, "supernet": r.supernet_path, "inherited_from": r.inherited_from,
                              "skipped": r.skipped} for r in results}))
    return 0


def register(subparsers) -> None:
    """`raynas train-sizes CONFIG`: to be registered by `raynas.train.cli.register`."""
    parser = subparsers.add_parser("train-sizes", help="size-specific supernets with weight inheritance (AutoViT)")
    add_arguments(parser)
    parser.set_defaults(func=cmd_train_sizes)


__all__ = ["InheritStrategy", "Stage", "StageResult", "inherit_from_checkpoint", "load_chain_config",
           "plan_size_specific", "register", "train_size_specific"]
