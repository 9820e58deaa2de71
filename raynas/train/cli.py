"""`raynas train CONFIG.yaml`: train a supernet on Ray Train (plugged into the `raynas` command)."""

from __future__ import annotations

import argparse
import json

from raynas.cli_args import POSITIVE


def add_plugin_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE (driver and every worker) for the strategies it registers; "
                        "repeatable. Strategies of installed packages come from the 'raynas.strategies' "
                        "entry-point group without this")


def add_train_arguments(parser: argparse.ArgumentParser, config_flag: bool = False) -> None:
    """The `raynas train` options; `config_flag` takes the config as `--config` (job specs) instead of
    a positional argument."""
    if config_flag:
        parser.add_argument("--config", required=True, help="training config YAML (see pipelines/configs/)")
    else:
        parser.add_argument("config", help="training config YAML (see pipelines/configs/)")
    parser.add_argument("--num-workers", type=POSITIVE, help="Ray Train workers (overrides scaling.num_workers)")
    parser.add_argument("--use-gpu", action="store_true", default=None,
                        help="one GPU per worker (overrides scaling.use_gpu)")
    parser.add_argument("--name", help="run name (default: config name, else the file's stem); "
                        "re-running a name resumes it")
    parser.add_argument("--storage", help="directory or URI (s3://bucket/prefix, gs://...) holding runs "
                        "(overrides storage_path)")
    parser.add_argument("--epochs", type=POSITIVE, help="total epochs (overrides epochs)")
    add_plugin_argument(parser)


def overrides_from_args(args: argparse.Namespace) -> dict:
    return {"scaling.num_workers": args.num_workers, "scaling.use_gpu": args.use_gpu, "name": args.name,
            "storage_path": args.storage, "epochs": args.epochs}


def cmd_train(args: argparse.Namespace) -> int:
    from raynas.train.config import load_train_config
    from raynas.train.strategies import load_plugins
    from raynas.train.trainer import train

    load_plugins(args.plugin)  # before validation: the config may name a plug-in strategy
    cfg = load_train_config(args.config, overrides_from_args(args))
    result = train(cfg, plugins=args.plugin)
    print(json.dumps({"run_dir": result.run_dir, "supernet": result.supernet_path,
                      "metrics": result.metrics_path, "checkpoint": result.checkpoint_dir}))
    return 0


def cmd_train_sizes(args: argparse.Namespace) -> int:
    """`raynas train-sizes CHAIN.yaml`: the `raynas train` flags set the chain's name and storage and
    every stage's shared `train` keys."""
    from raynas.train.chain import load_chain_config, train_size_specific
    from raynas.train.strategies import load_plugins

    load_plugins(args.plugin)
    overrides = {("" if key in ("name", "storage_path") else "train.") + key: value
                 for key, value in overrides_from_args(args).items()}
    results = train_size_specific(load_chain_config(args.config, overrides), plugins=args.plugin)
    print(json.dumps({r.key: {"run_dir": r.run_dir, "supernet": r.supernet_path, "inherited_from": r.inherited_from,
                              "skipped": r.skipped} for r in results}))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a supernet with Ray Train (resumes a run by name)")
    add_train_arguments(parser)
    parser.set_defaults(func=cmd_train)

    parser = subparsers.add_parser("train-sizes", help="size-specific supernets with weight inheritance (AutoViT): "
                                   "a chain YAML (see pipelines/configs/train_autovit_sizes.yaml)")
    add_train_arguments(parser)
    parser.set_defaults(func=cmd_train_sizes)

