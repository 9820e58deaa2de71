"""Size-specific chains (seed 001, AutoViT §3.2 and §5.2): train a larger supernet, then smaller ones
initialised from it.

AutoViT splits its search space by model size into independent supernets (XXS, XS, S) so small
and large subnets do not fight over shared weights, and lets the smaller supernets start from the
larger one (`raynas.train.inherit`). The chain is: train `autovit-s`, initialise `autovit-xs` and
`autovit-xxs` from it, train each.

`train_size_specific(cfg)` runs such a chain, one `raynas train` run per stage (so each stage gets
Ray Train, checkpoints, resume and metrics as any run); a stage that inherits trains with the
`inherit` strategy wrapped around its own. Re-running a chain skips finished stages and resumes an
interrupted one.

Chain config (`pipelines/configs/train_autovit_sizes.yaml`):
    name: autovit_sizes            # stage runs go to <storage_path>/<name>/<stage>
    storage_path: ~/raynas_runs
    train: {...}                   # `raynas train` keys shared by all stages (not name / space / storage_path)
    stages:
      - space: autovit-s           # built-in name or YAML path; `name:` defaults to the space's name
      - {space: autovit-xs, inherit_from: autovit-s, train: {...per-stage overrides...}}
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raynas import config as c
from raynas import storage
from raynas.errors import ConfigError, UserError
from raynas.space import SearchSpace
from raynas.train.inherit import INHERIT_STRATEGY, inherit_function
from raynas.train.strategies import get_strategy_class, load_plugins

CHAIN_KEYS = ("name", "storage_path", "train", "stages")
STAGE_KEYS = ("space", "name", "inherit_from", "train")
RESERVED_TRAIN_KEYS = ("name", "space", "storage_path")
CHAIN_FILE = "chain.json"


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


# ---- the config file -----------------------------------------------------------------------------
def load_chain_config(location: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a chain YAML (a local path or URI); overrides use dotted keys ({"train.scaling.num_workers": 2}).
    Stage spaces given as relative .yaml paths are relative to a local config file."""
    location = str(location)
    cfg = c.apply_overrides(c.read_yaml(location), overrides)
    cfg.setdefault("name", Path(storage.basename(location)).stem)
    if storage.is_uri(location):
        return cfg
    for stage in cfg.get("stages") or []:
        space = stage.get("space") if isinstance(stage, dict) else None
        if isinstance(space, str) and space.endswith((".yaml", ".yml")) and not Path(space).is_absolute():
            candidate = Path(location).parent / space
            if candidate.is_file():
                stage["space"] = str(candidate.resolve())
    return cfg


# ---- planning: the whole chain validated before any compute ------------------------------------------
def _deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _train_section(value: Any, where: str) -> dict[str, Any]:
    """`train:` keys of the chain or of a stage; the stage alone says its name, space and storage."""
    section = {} if value is None else c.mapping(value, where)
    for key in RESERVED_TRAIN_KEYS:
        if key in section:
            c.fail(c.join(where, key), "not allowed here", "set per stage: stages[].space / stages[].name")
    return section


def _chain_settings(cfg: Any) -> tuple[str, dict[str, Any], list]:
    """(the chain's directory, the shared `train` keys, the raw stages) of a chain config."""
    cfg = c.mapping(cfg, "config")
    c.check_known(cfg, CHAIN_KEYS, "")
    name = cfg.get("name")
    if not isinstance(name, str) or not name.strip() or "/" in name:
        c.fail("name", f"got {name!r}", "a chain name without '/'")
    storage_path = c.location(cfg.get("storage_path", "~/raynas_runs"), "storage_path")
    stages = cfg.get("stages")
    if not isinstance(stages, list) or not stages:
        c.fail("stages", f"got {stages!r}", "a non-empty list of {space, inherit_from?, name?, train?}")
    return storage.join(storage_path, name), _train_section(cfg.get("train"), "train"), stages


def _stage_entry(raw: Any, where: str) -> tuple[str, dict[str, Any]]:
    """(the stage's name, its checked entry) of one item of `stages`."""
    from raynas.space import load_space

    raw = c.mapping({"space": raw} if isinstance(raw, str) else raw, where)
    c.check_known(raw, STAGE_KEYS, where)
    if not isinstance(raw.get("space"), str):
        c.fail(f"{where}.space", f"got {raw.get('space')!r}", "a built-in space name or a .yaml path")
    raw["train"] = _train_section(raw.get("train"), f"{where}.train")
    try:
        key = raw.get("name") or load_space(raw["space"]).name
    except UserError as exc:
        raise ConfigError(f"{where}.space: {exc}") from None
    if not isinstance(key, str) or "/" in key or not key.strip():
        c.fail(f"{where}.name", f"got {key!r}", "a stage name without '/'")
    return key, raw


def _inherited_fraction(source: Stage, plan, supernets: Mapping[str, Any], where: str) -> float:
    """Dry run of the inheritance on freshly built supernets: the part of the stage's weights it sets."""
    from raynas.supernets import build_supernet

    if source.space.family != plan.space.family:
        raise ConfigError(f"{where}.inherit_from: stage '{source.key}' is '{source.space.family}', "
                          f"this stage '{plan.space.family}'")
    strategy = plan.cfg["strategy"]["name"]
    if get_strategy_class(strategy).LOADS_WEIGHTS:
        raise ConfigError(f"{where}.train.strategy: '{strategy}' loads its own weights; it cannot inherit")
    dst = build_supernet(plan.space, **plan.cfg["supernet"])
    try:
        report = inherit_function(plan.space.family, f"{where}.inherit_from")(supernets[source.key], dst)
    except UserError as exc:
        raise ConfigError(f"{where}.inherit_from: {exc}") from None
    total = sum(t.numel() for t in dst.state_dict().values())
    return report["elements"] / max(total, 1)


def plan_size_specific(cfg: Mapping[str, Any]) -> list[Stage]:
    """Validate the whole chain before any compute: every stage's training config, the stage
    references, and that each inheritance is possible (a dry run on freshly built supernets)."""
    from raynas.supernets import build_supernet
    from raynas.train.trainer import SUPERNET_FILE, plan_run

    chain_dir, shared, entries = _chain_settings(cfg)
    stages: list[Stage] = []
    supernets: dict[str, Any] = {}
    for i, raw in enumerate(entries):
        where = f"stages[{i}]"
        key, raw = _stage_entry(raw, where)
        if any(s.key == key for s in stages):
            raise ConfigError(f"{where}.name: stage '{key}' appears twice; give one of them a `name`")
        train_cfg = _deep_merge(shared, raw["train"])
        train_cfg.update(space=raw["space"], storage_path=chain_dir, name=key)
        try:
            plan = plan_run(train_cfg)
        except UserError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        source, shared_fraction = raw.get("inherit_from"), None
        if source is not None:
            earlier = {s.key: s for s in stages}
            if source not in earlier:
                raise ConfigError(f"{where}.inherit_from: '{source}' is not an earlier stage; allowed: {list(earlier)}")
            shared_fraction = _inherited_fraction(earlier[source], plan, supernets, where)
        supernets[key] = build_supernet(plan.space, **plan.cfg["supernet"])
        done = plan.resume_epoch >= plan.cfg["epochs"] and storage.is_file(storage.join(plan.run_dir, SUPERNET_FILE))
        stages.append(Stage(key, plan.cfg, plan.space, source, plan.run_dir, done, shared_fraction))
    return stages


# ---- training ------------------------------------------------------------------------------------
def _stage_config(stage: Stage, inherit_path: str | None) -> dict[str, Any]:
    cfg = copy.deepcopy(stage.cfg)
    if inherit_path is not None:
        cfg["strategy"] = {"name": INHERIT_STRATEGY, "init_from": inherit_path, "base": cfg["strategy"]}
    return cfg


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"raynas train-sizes: {msg}", file=sys.stderr, flush=True)


def _run_stage(stage: Stage, source: str | None, quiet: bool, plugins: Sequence[str]) -> StageResult:
    """Train one stage (from `source`'s weights when it inherits), or skip it when already trained."""
    from raynas.train.metrics import read_metrics
    from raynas.train.trainer import SUPERNET_FILE, train

    if stage.done:
        _say(quiet, f"stage '{stage.key}' already trained ({storage.display(stage.run_dir)}); skipped")
        result = StageResult(stage.key, stage.run_dir, storage.join(stage.run_dir, SUPERNET_FILE), source, True)
    else:
        if source is not None:
            _say(quiet, f"stage '{stage.key}' inherits {100 * stage.shared_fraction:.1f}% of its weights from "
                        f"'{stage.inherit_from}' ({storage.display(source)})")
        trained = train(_stage_config(stage, source), quiet=quiet, plugins=plugins)
        result = StageResult(stage.key, trained.run_dir, trained.supernet_path, source, False)
    result.metrics = read_metrics(result.run_dir)
    return result


def _summary_entry(stage: Stage, result: StageResult) -> dict[str, Any]:
    last = result.metrics.sort_values("epoch").iloc[-1].to_dict() if len(result.metrics) else {}
    return {"stage": stage.key, "space": stage.space.name, "run_dir": result.run_dir,
            "supernet": result.supernet_path, "inherit_from": stage.inherit_from,
            "inherited_fraction": stage.shared_fraction, "skipped": result.skipped,
            "last_epoch": {k: v for k, v in last.items() if isinstance(v, (int, float, str))}}


def train_size_specific(cfg: Mapping[str, Any], *, quiet: bool = False,
                        plugins: Sequence[str] = ()) -> list[StageResult]:
    """Train the chain's stages in order; inheriting stages start from their source's trained weights.

    Writes `<storage_path>/<name>/chain.json` (stages, run directories, inheritance, last metrics);
    `storage_path` is a local path or a URI. `plugins`: strategy modules named on the command line.
    """
    load_plugins(plugins)
    stages = plan_size_specific(cfg)
    results: dict[str, StageResult] = {}
    for stage in stages:
        source = results[stage.inherit_from].supernet_path if stage.inherit_from else None
        results[stage.key] = _run_stage(stage, source, quiet, plugins)
    summary = [_summary_entry(stage, results[stage.key]) for stage in stages]
    chain_dir = storage.parent(stages[0].run_dir)
    storage.write_text(storage.join(chain_dir, CHAIN_FILE), json.dumps(summary, indent=2, default=float))
    return [results[s.key] for s in stages]


__all__ = ["Stage", "StageResult", "load_chain_config", "plan_size_specific", "train_size_specific"]
