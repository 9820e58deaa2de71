"""`raynas demo` (the embedded default) and `raynas pipeline CONFIG` (any hw-NAS pipeline config)."""

from __future__ import annotations

import json


def cmd_pipeline(args) -> None:
    from raynas.end_to_end.hw_nas import load_pipeline_config, run_pipeline

    print(json.dumps(run_pipeline(load_pipeline_config(args.config, args.run_dir)), default=str))


def cmd_demo(args) -> None:
    from raynas.end_to_end.hw_nas import DEMO_CONFIG, load_pipeline_config, run_pipeline

    print(json.dumps(run_pipeline(load_pipeline_config(DEMO_CONFIG, args.run_dir)), default=str))


def register(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the embedded default: digits, local Ray, CPU")
    p.add_argument("--run-dir", dest="run_dir", default="runs/demo", help="a local path or a URI (s3://...)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("pipeline", help="train -> profile -> search -> export -> report, from one config")
    p.add_argument("config")
    p.add_argument("--run-dir", dest="run_dir", help="override run_dir (a local path or a URI such as s3://...)")
    p.set_defaults(func=cmd_pipeline)
