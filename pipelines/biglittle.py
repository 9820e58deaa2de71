"""The big/little pipeline on a Ray cluster: co-train, search pairs, export the chosen pair, run it.

    ray job submit -- python pipelines/biglittle.py --train pipelines/configs/biglittle_digits.yaml \
        --search pipelines/configs/biglittle_search.yaml --out runs/biglittle_deploy

Thin on purpose: each step is the library call behind a `raynas` command (train, biglittle search,
biglittle export, biglittle run). A step whose output already exists in storage is resumed, not redone.
Every location (the training's storage_path, the search's run_dir, --out) may be a local path or a URI.
"""

from __future__ import annotations

import argparse
import json
import sys

from raynas.errors import UserError


def main(argv: list[str] | None = None) -> int:
    from raynas import storage
    from raynas.biglittle.cli import parse_data
    from raynas.biglittle.deploy import export_pair, run_routed
    from raynas.biglittle.evaluate import eval_data
    from raynas.biglittle.search import load_model, run_pair_search
    from raynas.config import read_yaml
    from raynas.end_to_end.hw_nas import trained_supernet
    from raynas.space import Arch
    from raynas.train.config import load_train_config
    from raynas.train.trainer import train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, help="training config with strategy 'biglittle'")
    ap.add_argument("--search", required=True, help="pair-search config (its checkpoint is set from the training)")
    ap.add_argument("--out", required=True, help="directory (a local path or a URI) for the exported pair")
    ap.add_argument("--tau", type=float, help="routing threshold of the deployed pair (default: the search's)")
    ap.add_argument("--epochs", type=int, help="override the training config's epochs")
    ap.add_argument("--budget", type=int, help="override the search budget")
    args = ap.parse_args(argv)
    try:
        from raynas.hw.devices import init_local_ray

        storage.check_writable(args.out, "--out")  # before hours of training
        init_local_ray()  # RAY_ADDRESS (ray job submit) or a fresh local Ray, never a stray session's cluster
        train_cfg = load_train_config(args.train, {"epochs": args.epochs})
        checkpoint = trained_supernet(train_cfg) or str(train(train_cfg).supernet_path)
        search_cfg = read_yaml(args.search)
        search_cfg["checkpoint"] = checkpoint
        if args.budget:
            search_cfg.setdefault("search", {})["budget"] = args.budget
        summary = run_pair_search(search_cfg, resume=True)
        if not summary["front_points"]:
            raise UserError("search: no feasible pair; relax constraints.max_peak_latency_ms")
        chosen = max(summary["front_points"], key=lambda r: r["accuracy"])
        model = load_model(checkpoint, search_cfg.get("router", "checkpoint"))  # as searched
        data_cfg = parse_data(json.dumps(search_cfg.get("data") or {"name": "digits"}))
        data = eval_data(data_cfg, model.space.resolution, model.space.in_channels)
        tau = args.tau if args.tau is not None else float(search_cfg.get("tau", 0.8))
        export_pair(model, Arch.from_json(chosen["arch"]), data, args.out, tau)
        print(json.dumps({"search": summary["run_dir"], "chosen": chosen, "deployed": run_routed(args.out, data_cfg)}))
    except UserError as exc:
        print(f"biglittle pipeline: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
