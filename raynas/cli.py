"""The `raynas` command. Machine-readable output (JSON) goes to stdout, progress to stderr."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from raynas.cli_args import POSITIVE, SEED, ArgumentParser, integer, json_argument
from raynas.errors import UserError


def parse_arch(text: str, space) -> object:
    """An arch from inline JSON or from a file containing JSON, validated against `space`."""
    return space.validate(json_argument(text, "--arch"))


# ---- spaces ------------------------------------------------------------------------------------
def cmd_spaces_list(args) -> None:
    from raynas.space import builtin_space_names, load_space

    rows = [load_space(n).summary() for n in builtin_space_names()]
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['name']:<16} family={r['family']:<11} dims={r['num_dims']:<4} "
                  f"log10|A|={r['log10_cardinality']:.2f}")


def cmd_spaces_sample(args) -> None:
    import numpy as np

    from raynas.space import load_space

    space = load_space(args.space)
    rng = np.random.default_rng(args.seed)
    for _ in range(args.n):
        print(space.sample(rng).to_json())


def cmd_spaces_show(args) -> None:
    from raynas.space import load_space

    space = load_space(args.space)
    info = space.summary()
    info["dims"] = {d.name: list(d.choices) for d in space.dims}
    info["min_arch"] = space.min_arch().to_dict()
    info["max_arch"] = space.max_arch().to_dict()
    # The well-known models the space holds (a search measures them beside its front), as one-line summaries.
    info["references"] = {ref.name: {"description": ref.description, "arch": space.arch_summary(ref.arch)}
                          for ref in space.references.values()}
    print(json.dumps(info, indent=1))


# ---- arch ----------------------------------------------------------------------------------------
def _space_and_supernet(args):
    from raynas.space import load_space
    from raynas.supernets import build_supernet

    space = load_space(args.space, num_classes=getattr(args, "num_classes", None),
                       resolution=getattr(args, "resolution", None))
    return space, build_supernet(space)


def cmd_arch_cost(args) -> None:
    space, supernet = _space_and_supernet(args)
    arch = parse_arch(args.arch, space)
    print(json.dumps({"space": space.name, "arch": arch.to_dict(), **supernet.cost(arch)}))


# ---- export --------------------------------------------------------------------------------------
def export_target(out: str) -> tuple[str, bool]:
    """`--out` as (location, is_directory): a location not ending in `.onnx` (or ending in `/`, or an existing
    directory) is a directory that receives `<space>-<arch digest>.onnx` (`-<precision>` before `.onnx` when not
    fp32); otherwise it is the file itself."""
    from raynas import storage

    location = storage.normalize(out)
    directory = out.endswith("/") or not out.endswith(".onnx") or storage.is_dir(location)
    return location, directory


def _export_supernet(args):
    """The supernet `export` extracts from: the checkpoint's (as trained: classes, resolution, hypernet,
    MoLE; a big/little pair's big member) or, without one, a fresh one of --space."""
    from raynas.supernets.checkpoint import load_supernet

    if not args.checkpoint:
        return _space_and_supernet(args)[1]
    from raynas.space import load_space

    supernet = load_supernet(args.checkpoint, member=True)  # a big/little pair: its big member
    # --space names a space; the checkpoint holds its whole (possibly edited) declaration, which wins.
    wanted = load_space(args.space).name
    if supernet.space.name != wanted:
        raise UserError(f"--checkpoint: {args.checkpoint} was trained on space '{supernet.space.name}', "
                        f"not '{wanted}'")
    return supernet


def _precision(text: str) -> str:
    """`--precision`, checked where it is declared (raynas.hw.precision, imported only by `export`)."""
    from raynas.hw.precision import check_precision

    return check_precision(text, "--precision")


def _run_config_of(checkpoint: str) -> str | None:
    """The config of the `raynas train` run that wrote `checkpoint`: `config.yaml` in the run directory, which
    holds the final supernet.pt and, one level down, the epoch checkpoints (epoch_NNNN/supernet.pt)."""
    from raynas import storage
    from raynas.train.checkpointing import CHECKPOINT_DIR_PATTERN
    from raynas.train.trainer import CONFIG_FILE

    directory = storage.parent(storage.normalize(checkpoint))
    if CHECKPOINT_DIR_PATTERN.fullmatch(storage.basename(directory)):
        directory = storage.parent(directory)
    candidate = storage.join(directory, CONFIG_FILE)
    return candidate if storage.is_file(candidate) else None


def _export_data(args) -> tuple[dict | None, str]:
    """The data that calibrates INT8 and measures accuracy, and where it came from (or why there is none):
    --data, else the data the checkpoint was trained on (its run's config), else none."""
    from raynas import storage
    from raynas.biglittle.cli import parse_data

    if args.data:
        return parse_data(args.data), "--data"
    if not args.checkpoint:
        return None, "no --data and no --checkpoint (a fresh supernet)"
    run_config = _run_config_of(args.checkpoint)
    if run_config is None:
        return None, f"no --data and no run config (config.yaml) beside {storage.display(args.checkpoint)}"
    return parse_data(run_config), storage.display(run_config)


def _deploy_arrays(supernet, arch, data: dict, resolution: int, args) -> dict:
    """Recalibrate the BN statistics of `arch` on training images (as the search's evaluators score it, so the
    exported model is the one the search measured); the arrays calibration and accuracy read: training images
    (the BN ones, a seeded subset) and the validation split."""
    from raynas.biglittle.evaluate import eval_data
    from raynas.data import dataset_num_classes
    from raynas.hw.onnx_accuracy import labelled_arrays
    from raynas.train.bn import recalibrate_bn

    classes, space = dataset_num_classes(data), supernet.space
    if classes != space.num_classes:
        raise UserError(f"--data: dataset '{data['name']}' has {classes} classes, the supernet {space.num_classes}; "
                        "allowed: the data the checkpoint was trained on")
    sets = eval_data(data, resolution, space.in_channels, max(args.bn_samples, args.calibration_images))
    bn_images = min(args.bn_samples, sets.bn_samples)
    recalibrate_bn(supernet, arch, sets.bn_loader, bn_images)
    train_images, _ = labelled_arrays(sets.bn_loader)
    val_images, val_labels = labelled_arrays(sets.val_loader)
    return {"train": train_images, "val": val_images, "labels": val_labels, "bn_images": bn_images}


def _accuracy_fields(verified, arrays: dict | None, data: dict | None, data_from: str) -> dict:
    """Top-1 on the validation split of the FP32 graph and of the written model, in onnxruntime; null, with
    the reason, without data."""
    from raynas.hw.onnx_accuracy import onnx_accuracy

    if arrays is None:
        return {"accuracy_fp32": None, "accuracy": None, "accuracy_images": None,
                "accuracy_skipped": f"no data: {data_from}", "data": None, "data_from": None,
                "bn_recalibration_images": None}
    fp32 = onnx_accuracy(verified.fp32, arrays["val"], arrays["labels"])
    same = verified.info["precision"] == "fp32"  # the written model is the FP32 graph itself
    deployed = fp32 if same else onnx_accuracy(verified.model, arrays["val"], arrays["labels"])
    return {"accuracy_fp32": fp32, "accuracy": deployed, "accuracy_images": len(arrays["labels"]),
            "accuracy_skipped": None, "data": data["name"], "data_from": data_from,
            "bn_recalibration_images": arrays["bn_images"]}


def cmd_export(args) -> None:
    import hashlib

    from raynas import storage
    from raynas.hw.onnx_accuracy import calibration_batches
    from raynas.hw.onnx_export import verified_onnx

    out, out_is_dir = export_target(args.out)
    # Before loading anything: an unwritable --out fails now, not after the export.
    storage.check_writable(out if out_is_dir else storage.parent(out), "--out")
    supernet = _export_supernet(args).eval()
    space = supernet.space
    arch = parse_arch(args.arch, space)
    resolution = args.resolution or space.resolution
    data, data_from = _export_data(args)
    if data is None and args.checkpoint and args.precision == "int8":
        # Ranges fitted on noise would quietly cost a trained model its accuracy.
        raise UserError(f"--data: missing ({data_from}); INT8 calibrates a trained checkpoint on its training "
                        "images; allowed: a dataset name, JSON object or YAML with a data section")
    arrays = _deploy_arrays(supernet, arch, data, resolution, args) if data is not None else None
    calibration = None
    if args.precision == "int8" and arrays is not None:
        calibration = calibration_batches(arrays["train"], args.calibration_images)
    verified = verified_onnx(supernet.extract(arch, resolution), supernet.input_shape(1, resolution),
                             args.precision, calibration)
    if out_is_dir:
        digest = hashlib.sha256(arch.to_json().encode()).hexdigest()[:12]
        suffix = "" if args.precision == "fp32" else f"-{args.precision}"
        out = storage.join(out, f"{space.name}-{digest}{suffix}.onnx")
    storage.write_bytes(out, verified.model)
    calibrated_on = None
    if args.precision == "int8":
        calibrated_on = (f"{sum(len(b) for b in calibration)} training images" if calibration is not None
                         else "seeded inputs (fit for latency only)")
    print(json.dumps({"space": space.name, "arch": arch.to_dict(), "path": out, **verified.info,
                      "calibration": calibrated_on, **_accuracy_fields(verified, arrays, data, data_from),
                      **supernet.cost(arch, resolution)}))


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="raynas", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    spaces = sub.add_parser("spaces", help="list, show and sample search spaces")
    spaces_sub = spaces.add_subparsers(dest="spaces_command", required=True)
    p = spaces_sub.add_parser("list", help="the built-in spaces")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_spaces_list)
    p = spaces_sub.add_parser("show", help="dimensions and extreme archs of one space")
    p.add_argument("space")
    p.set_defaults(func=cmd_spaces_show)
    p = spaces_sub.add_parser("sample", help="random archs, one JSON object per line")
    p.add_argument("space")
    p.add_argument("-n", type=POSITIVE, default=1)
    p.add_argument("--seed", type=SEED, default=0)
    p.set_defaults(func=cmd_spaces_sample)

    arch = sub.add_parser("arch", help="inspect one architecture")
    arch_sub = arch.add_subparsers(dest="arch_command", required=True)
    p = arch_sub.add_parser("cost", help="exact params and MACs")
    p.add_argument("--space", required=True)
    p.add_argument("--arch", required=True, help="JSON object or a file holding one")
    p.add_argument("--num-classes", type=POSITIVE)
    p.add_argument("--resolution", type=integer(8))
    p.set_defaults(func=cmd_arch_cost)

    p = sub.add_parser("export", help="extract a subnet and write it as verified ONNX")
    p.add_argument("--space", required=True)
    p.add_argument("--arch", required=True, help="JSON object or a file holding one")
    p.add_argument("--out", required=True, help="the .onnx file, or a directory (a local path or a URI such as "
                   "s3://bucket/prefix) that receives <space>-<arch digest>[-<precision>].onnx")
    p.add_argument("--checkpoint", help="supernet checkpoint (a local path or a URI)")
    p.add_argument("--resolution", type=integer(8))
    p.add_argument("--precision", type=_precision, default="fp32",
                   help="fp32 (default), fp16 or int8: the precision the board runs; fp16 converts the verified "
                   "FP32 graph, int8 is static QDQ quantization (per-channel weights) calibrated on training images")
    p.add_argument("--calibration-images", type=POSITIVE, default=64, dest="calibration_images",
                   help="training images that calibrate INT8 activation ranges")
    p.add_argument("--data", help="data for calibration (training split) and accuracy (validation split): a "
                   "dataset name, JSON object or YAML with a data section; default: the data the checkpoint's "
                   "run trained on (its config.yaml)")
    p.add_argument("--bn-samples", type=POSITIVE, default=2048, dest="bn_samples",
                   help="training images that recalibrate the subnet's BatchNorm statistics when there is data")
    p.set_defaults(func=cmd_export, num_classes=None)

    for register in _extension_commands():
        register(sub)
    return parser


def _extension_commands() -> list[Callable]:
    """Subcommands living next to their library code (train, profile, search, ...)."""
    import importlib

    registers = []
    for module in ("raynas.train.cli", "raynas.hw.cli", "raynas.search.cli", "raynas.tune.cli",
                   "raynas.biglittle.cli", "raynas.end_to_end.cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if not module.startswith(exc.name or "?"):  # a missing dependency is a real error
                raise
            continue
        registers.append(mod.register)
    return registers


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)  # a bad argument is a UserError too (raynas.cli_args)
        result = args.func(args)
    except UserError as exc:
        print(f"raynas: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raynas: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `raynas spaces show X | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
