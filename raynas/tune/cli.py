"""`raynas tune CONFIG.yaml`: sweep big/little loss weights, temperature, tau and router settings with
Ray Tune (OptunaSearch + ASHA), every trial trained through Ray Train."""

from __future__ import annotations

import json

from raynas.cli_args import POSITIVE


def cmd_tune(args) -> None:
    from raynas.tune.config import load_tune_config
    from raynas.tune.sweep import run_tune

    sweep = load_tune_config(args.config, {"name": args.name, "storage_path": args.storage,
                                           "num_samples": args.num_samples})
    print(json.dumps(run_tune(sweep)))


def register(subparsers) -> None:
    p = subparsers.add_parser("tune", help="Ray Tune sweep (Optuna + ASHA) of big/little loss and router settings")
    p.add_argument("config", help="tune YAML (see pipelines/configs/tune_biglittle.yaml)")
    p.add_argument("--name", help="sweep name (default: config name, else the file's stem)")
    p.add_argument("--storage", help="directory or URI (s3://bucket/prefix) holding sweeps (overrides storage_path)")
    p.add_argument("--num-samples", type=POSITIVE, dest="num_samples", help="number of trials (overrides num_samples)")
    p.set_defaults(func=cmd_tune)
