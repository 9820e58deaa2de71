"""Size-specific supernets with weight inheritance (AutoViT, seed 001) on a Ray cluster:
`ray job submit -- python pipelines/train_size_specific.py --config pipelines/configs/train_autovit_sizes.yaml`.

Trains the chain's first supernet (autovit-s), initialises the smaller ones (autovit-xs, autovit-xxs)
from it by weight inheritance and trains each. Thin on purpose: the library does the work
(`raynas.train.chain.train_size_specific`); re-running the same chain resumes it.
"""

from __future__ import annotations

import argparse
import sys

from raynas.errors import UserError
from raynas.train.cli import add_train_arguments, cmd_train_sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_train_arguments(parser, config_flag=True)
    args = parser.parse_args(argv)
    try:
        return cmd_train_sizes(args)
    except UserError as exc:
        print(f"train_size_specific: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
