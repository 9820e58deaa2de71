"""`raynas biglittle ...`: evaluate, search, export and run co-trained big/little pairs.

  raynas train pipelines/configs/biglittle_digits.yaml            co-train (strategy 'biglittle')
  raynas biglittle evaluate --checkpoint C --data digits           metrics and the tau curve of a pair
  raynas biglittle evaluate --checkpoint C --out DIR [--models D]  + seed 002's analysis figures and tables
  raynas biglittle search pipelines/configs/biglittle_search.yaml multi-objective search over pairs
  raynas biglittle export --checkpoint C --out DIR --tau 0.8       ONNX big / little / router (+ trunk)
                          [--precision fp32|fp16|int8]             ... at the precision the board runs
  raynas biglittle run --models DIR --data digits                  routed pair per input in onnxruntime
  raynas biglittle precisions --checkpoint C --out DIR --device D  accuracy / latency / size per precision
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raynas.cli_args import POSITIVE, integer, json_argument, number, number_list
from raynas.errors import UserError


def _precision(text: str) -> str:
    """`--precision`: a name of raynas.hw.precision (whether the device runs it is checked by the command)."""
    from raynas.hw.precision import check_precision

    return check_precision(text.strip(), "--precision")


def _precision_list(text: str) -> list[str]:
    from raynas.hw.precision import check_precision

    return [check_precision(t.strip(), "--precisions") for t in text.split(",")]


def parse_data(text: str) -> dict[str, Any]:
    """`--data`: a dataset name (digits, synthetic), a JSON object, or a YAML file with a data section."""
    from raynas.config import read_yaml
    from raynas.data import validate_data_config

    text = text.strip()
    if text.startswith("{"):
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"--data: not valid JSON ({exc.msg})") from None
    elif text.endswith((".yaml", ".yml")) or Path(text).is_file():
        cfg = read_yaml(text, "--data")
        cfg = cfg.get("data", cfg)
    else:
        cfg = {"name": text}
    return validate_data_config(cfg)


def parse_pair(text: str | None, model) -> Any:
    """`--pair`: 'extreme' (largest big, smallest little), a pair JSON object, a file holding one, or a
    search run's front.parquet (`path.parquet[:i]`, the i-th front member, default the most accurate)."""
    ps = model.pair_space
    if text in (None, "extreme"):
        return ps.extreme_pair()
    if ".parquet" in text:
        from raynas import storage

        path, _, index = text.partition(".parquet")
        front = storage.read_pandas(path + ".parquet", "--pair")
        if front.empty:
            raise UserError(f"--pair: {path}.parquet holds no pairs")
        member = index.lstrip(":")
        if member and not (member.isdigit() and int(member) < len(front)):
            raise UserError(f"--pair: front member {member!r} is not allowed; allowed: 0 to {len(front) - 1}")
        row = front.iloc[int(member)] if member else front.sort_values("accuracy").iloc[-1]
        return ps.validate(json.loads(row["arch"]))
    return ps.validate(json_argument(text, "--pair"))


def _model_and_data(args):
    from raynas.biglittle.evaluate import eval_data
    from raynas.biglittle.search import load_model

    model = load_model(args.checkpoint, args.router)
    data = eval_data(parse_data(args.data), model.space.resolution, model.space.in_channels, args.bn_samples)
    return model, data


def _fit_router_if_asked(args, model, pair, data) -> dict:
    if not getattr(args, "fit_router", 0):
        return {}
    from raynas.biglittle.evaluate import fit_router
    from raynas.data import Batches, Normalizer, eval_dataset, normalization

    cfg, space = parse_data(args.data), model.space
    train = eval_dataset(cfg, "train", space.resolution, space.in_channels)  # un-augmented, fixed order
    batches = Batches(train, 256, "cpu", Normalizer(*normalization(cfg, space.in_channels)))
    return fit_router(model, pair, data, batches, epochs=args.fit_router)


def cmd_evaluate(args) -> None:
    from raynas import storage
    from raynas.biglittle.costs import PairCostModel
    from raynas.biglittle.deploy import read_manifest
    from raynas.biglittle.evaluate import predict_pair
    from raynas.biglittle.metrics import default_taus, evaluate_routing, tau_curve

    if args.out:
        storage.check_writable(args.out, "--out")  # before loading anything
    manifests = {storage.display(d): read_manifest(d) for d in args.models or ()}
    model, data = _model_and_data(args)
    pair = parse_pair(args.pair, model)
    fitted = _fit_router_if_asked(args, model, pair, data)
    pred = predict_pair(model, pair, data)
    costs = PairCostModel(model).costs(pair)
    taus = args.taus or default_taus(pred, 11)
    report = {"pair": pair.to_dict(), "coupling": model.coupling, "router": model.router.name,
              **fitted, "at_tau": evaluate_routing(pred, args.tau, costs), "curve": tau_curve(pred, taus, costs)}
    if args.out:
        from raynas.biglittle.figures import DEFAULT_TAU_GRID, write_analysis

        report["analysis"] = write_analysis(args.out, pred, costs, args.tau, args.taus or DEFAULT_TAU_GRID,
                                            model.num_classes, manifests)
    print(json.dumps(report))


def cmd_search(args) -> None:
    from raynas.biglittle.search import run_pair_search
    from raynas.config import apply_overrides, read_yaml

    cfg = apply_overrides(read_yaml(args.config), {"checkpoint": args.checkpoint, "run_dir": args.run_dir})
    print(json.dumps(run_pair_search(cfg, resume=args.resume)))


def cmd_export(args) -> None:
    from raynas import storage
    from raynas.biglittle.deploy import export_pair
    from raynas.config import choice
    from raynas.hw.latency import MODEL_KINDS

    choice(args.latency_model, "--latency-model", MODEL_KINDS)
    _device(args).check_precision(args.precision, "--precision")
    storage.check_writable(args.out, "--out")  # before loading anything
    model, data = _model_and_data(args)
    pair = parse_pair(args.pair, model)
    fitted = _fit_router_if_asked(args, model, pair, data)
    latency = None
    if args.lut:
        from raynas.biglittle.costs import PieceLatency
        from raynas.hw.latency import load_latency_model

        latency = PieceLatency(load_latency_model(args.latency_model, args.lut, supernet=model.big_net,
                                                  device=args.device))
    manifest = export_pair(model, pair, data, args.out, args.tau, latency=latency,
                           measure_device=None if args.no_measure else args.device, precision=args.precision,
                           calibration_images=args.calibration_images)
    print(json.dumps({"out": args.out, "precision": manifest["precision"], "files": manifest["files"],
                      "size_mb": manifest["size_mb"], **fitted, "validation": manifest["validation"],
                      "validation_deployed": manifest["validation_deployed"], "piece_ms": manifest["piece_ms"]}))


def cmd_run(args) -> None:
    from raynas.biglittle.deploy import read_manifest, run_routed

    threads, providers = args.threads or 1, None
    if args.device:  # the device's execution provider and threads, at a precision it runs
        spec = _device(args)
        spec.check_precision(read_manifest(args.models)["precision"], "--models")
        threads, providers = args.threads or spec.threads, spec.providers
    print(json.dumps(run_routed(args.models, parse_data(args.data), split=args.split, limit=args.limit,
                                threads=threads, tau=args.tau, references=not args.no_references,
                                providers=providers)))


def cmd_precisions(args) -> None:
    from raynas import storage
    from raynas.biglittle.precision_table import precision_table, write_precision_table

    spec = _device(args)
    precisions = [spec.check_precision(p, "--precisions") for p in args.precisions or spec.runs_precisions]
    storage.check_writable(args.out, "--out")  # before loading anything
    model, data = _model_and_data(args)
    pair = parse_pair(args.pair, model)
    fitted = _fit_router_if_asked(args, model, pair, data)
    table = precision_table(model, pair, data, parse_data(args.data), args.out, args.tau, spec, precisions,
                            calibration_images=args.calibration_images, limit=args.limit)
    files = write_precision_table(table, args.out)
    print(json.dumps({"out": args.out, "device": spec.name, "pair": pair.to_dict(), **fitted, "files": files,
                      "rows": table.to_dict("records")}))


def _device(args):
    from raynas.hw.devices import get_device

    return get_device(args.device)


def _precision_args(p) -> None:
    p.add_argument("--calibration-images", type=POSITIVE, default=64, dest="calibration_images",
                   help="int8: training images whose activation ranges calibrate the quantization "
                        "(at most --bn-samples)")


def _checkpoint_args(p) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="supernet.pt (a local path or a URI) of a run trained with strategy 'biglittle'")
    p.add_argument("--data", default="digits", help="dataset name, JSON object or YAML with a data section")
    p.add_argument("--pair", default="extreme",
                   help="'extreme', pair JSON (or a file), or a search's front.parquet[:i]")
    p.add_argument("--tau", type=number(0, 1), default=0.8, help="routing threshold: little iff score >= tau")
    p.add_argument("--router", default="checkpoint", choices=["checkpoint", "confidence"],
                   help="the co-trained router, or the confidence cascade in its place")
    p.add_argument("--bn-samples", type=POSITIVE, default=512, dest="bn_samples")
    p.add_argument("--fit-router", type=integer(0), default=0, metavar="EPOCHS", dest="fit_router",
                   help="first fit the pre-router to this pair on the training images (supernet frozen)")


def register(subparsers) -> None:
    bl = subparsers.add_parser("biglittle", help="co-trained big/little pairs: evaluate, search, export, run")
    sub = bl.add_subparsers(dest="biglittle_command", required=True)

    p = sub.add_parser("evaluate", help="routing metrics of one pair and its accuracy-vs-E[cost] curve over tau")
    _checkpoint_args(p)
    # No upper bound: a threshold above every router score is meaningful (every input goes to the big model).
    p.add_argument("--taus", type=number_list(0),
                   help="comma-separated thresholds >= 0 (default: quantiles of the router scores; with --out "
                        "the sensitivity curve uses 0, 0.05, ..., 1)")
    p.add_argument("--out", help="directory (a local path or a URI) for the analysis figures (PNG) and tables "
                   "(Parquet, Markdown): reliability/ECE, exits per class, tau sensitivity, latency vs MACs")
    p.add_argument("--models", action="append", metavar="DIR",
                   help="an export directory (`raynas biglittle export`) whose timed pieces join the "
                        "latency-vs-MACs scatter; repeat for several devices or precisions")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("search", help="NSGA-II over (big, little[, split]) pairs on Ray actors")
    p.add_argument("config", help="pair-search YAML (see pipelines/configs/biglittle_search.yaml)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--checkpoint", help="override `checkpoint` (a local path or a URI)")
    p.add_argument("--run-dir", dest="run_dir", help="override `run_dir` (a local path or a URI such as s3://...)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export", help="export trunk / little / big / router as verified ONNX + manifest")
    _checkpoint_args(p)
    p.add_argument("--out", required=True, help="directory (a local path or a URI) for the ONNX files and "
                   "manifest.json")
    p.add_argument("--lut", help="latency LUT (raynas profile; a local path or a URI) to predict piece latencies")
    p.add_argument("--latency-model", default="lut", dest="latency_model",
                   help="a latency model kind of raynas.hw.latency (lut, linear, flops, params)")
    p.add_argument("--device", default="local-cpu",
                   help="the device exported for: it must run --precision, and its protocol times the pieces")
    p.add_argument("--no-measure", action="store_true", dest="no_measure", help="skip timing the pieces")
    p.add_argument("--precision", type=_precision, default="fp32", help="fp32 | fp16 | int8 (one the device runs)")
    _precision_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("run", help="run an exported pair per input in onnxruntime: accuracy and latency")
    p.add_argument("--models", required=True, help="directory (a local path or a URI) written by `raynas biglittle "
                   "export`")
    p.add_argument("--data", default="digits", help="dataset name, JSON object or YAML with a data section")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--limit", type=POSITIVE, help="first N inputs only")
    p.add_argument("--threads", type=POSITIVE, help="onnxruntime intra-op threads (default 1, or the device's)")
    p.add_argument("--device", help="run with this device's execution provider and threads (it must run the "
                   "exported precision); default the CPU provider")
    p.add_argument("--tau", type=number(0, 1), help="override the exported threshold")
    p.add_argument("--no-references", action="store_true", dest="no_references",
                   help="skip timing always-little / always-big on the same inputs")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("precisions", help="big, little and the routed pair at every precision a device runs: "
                       "accuracy, latency, size (Parquet + Markdown)")
    _checkpoint_args(p)
    p.add_argument("--out", required=True, help="directory (a local path or a URI) for precisions.parquet/.md "
                   "and one export per precision")
    p.add_argument("--device", default="local-cpu", help="device whose precisions are tabled and whose protocol "
                   "times the pieces")
    p.add_argument("--precisions", type=_precision_list, help="comma-separated subset (default: every precision the "
                   "device runs)")
    p.add_argument("--limit", type=POSITIVE, help="first N validation inputs only")
    _precision_args(p)
    p.set_defaults(func=cmd_precisions)
