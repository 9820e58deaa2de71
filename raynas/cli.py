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
    directory) is a directory that receives `<space>-<arch digest>.onnx`; otherwise it is the file itself."""
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


def cmd_export(args) -> None:
    import hashlib

    from raynas import storage
    from raynas.hw.onnx_export import export_onnx

    out, out_is_dir = export_target(args.out)
    # Before loading anything: an unwritable --out fails now, not after the export.
    storage.check_writable(out if out_is_dir else storage.parent(out), "--out")
    supernet = _export_supernet(args).eval()
    space = supernet.space
    arch = parse_arch(args.arch, space)
    resolution = args.resolution or space.resolution
    subnet = supernet.extract(arch, resolution)
    if out_is_dir:
        out = storage.join(out, f"{space.name}-{hashlib.sha256(arch.to_json().encode()).hexdigest()[:12]}.onnx")
    result = export_onnx(subnet, supernet.input_shape(1, resolution), out)
    print(json.dumps({"space": space.name, "arch": arch.to_dict(), **result, **supernet.cost(arch, resolution)}))


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
                   "s3://bucket/prefix) that receives <space>-<arch digest>.onnx")
    p.add_argument("--checkpoint", help="supernet checkpoint (a local path or a URI)")
    p.add_argument("--resolution", type=integer(8))
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
