"""Supernet training on Ray Train.

    from raynas.train import train, load_train_config, evaluate_subnet, recalibrate_bn
    result = train(load_train_config("pipelines/configs/train_sandwich.yaml"))

Modules, one concern each: `config` (the YAML schema, validated before compute), `trainer` (driver:
plan, TorchTrainer, resume look-up), `loop` (per-worker PyTorch loop), `strategies` (sampler + loss
per method, registry), `samplers`, `losses`, `optim`, `bn` (BN recalibration, subnet accuracy),
`evaluation` (end-of-epoch measurement), `checkpointing` (epoch checkpoints, RNG, resume),
`metrics` (Parquet per-epoch table), `cli` (`raynas train`).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "train": "raynas.train.trainer",
    "plan_run": "raynas.train.trainer",
    "TrainResult": "raynas.train.trainer",
    "load_train_config": "raynas.train.config",
    "validate_train_config": "raynas.train.config",
    "evaluate_subnet": "raynas.train.bn",
    "recalibrate_bn": "raynas.train.bn",
    "read_metrics": "raynas.train.metrics",
}


def __getattr__(name: str):
    # Lazy: strategy modules import raynas.train.* without paying for the driver's imports.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'raynas.train' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
