"""Train a supernet on a Ray cluster: `ray job submit -- python pipelines/train_supernet.py --config C.yaml`.

Thin on purpose: parses arguments, then calls the library exactly as `raynas train` does.
"""

from __future__ import annotations

import argparse
import sys

from raynas.errors import UserError
from raynas.train.cli import add_train_arguments, cmd_train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_train_arguments(parser, config_flag=True)
    args = parser.parse_args(argv)
    try:
        return cmd_train(args)
    except UserError as exc:
        print(f"train_supernet: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
