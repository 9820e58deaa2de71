"""`raynas search CONFIG.yaml [--resume]`."""

from __future__ import annotations

import json


def cmd_search(args) -> None:
    from raynas.config import apply_overrides, read_yaml
    from raynas.search.config import validate_search_config
    from raynas.search.runner import run_search_job

    cfg = apply_overrides(read_yaml(args.config), {"checkpoint": args.checkpoint, "run_dir": args.run_dir})
    cfg = validate_search_config(cfg)
    print(json.dumps(run_search_job(cfg, resume=args.resume)))


def register(sub) -> None:
    p = sub.add_parser("search", help="search a trained supernet on Ray actors; export the Pareto front")
    p.add_argument("config", help="search config YAML (see pipelines/configs/search_*.yaml)")
    p.add_argument("--resume", action="store_true", help="continue the search stored in run_dir")
    p.add_argument("--checkpoint", help="override `checkpoint` (a local path or a URI such as s3://bucket/key)")
    p.add_argument("--run-dir", dest="run_dir", help="override `run_dir` (a local path or a URI)")
    p.set_defaults(func=cmd_search)
