"""Training-step overhead of weight sharing: a subnet trained through its supernet vs. the same
subnet extracted as a static module.

For every built-in space (or those given) at a small resolution: one SGD step (forward, loss,
backward, update) of arch A as `supernet(x, A)` and as `supernet.extract(A)`, on the same batch,
median over repeats (the two alternate step by step). Prints a table of the ratio (target <= 1.2x
for weight slicing). The supernet's step includes what weight sharing really costs: gradients and
the update of the full shared tensors the subnet slices.

    python benchmarks/train_overhead.py [--spaces nb201 mbv3-biglittle] [--resolution 32]
           [--batch 32] [--repeats 20] [--threads 1] [--supernet-option key=value ...] [--out f.parquet]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


class StepTimer:
    """One SGD step (zero grads, forward, cross-entropy, backward, update) of one model, timed."""

    def __init__(self, forward, params, x, y):
        self.forward, self.x, self.y = forward, x, y
        self.opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        self.times: list[float] = []

    def step(self, record: bool) -> None:
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.forward(self.x), self.y).backward()
        self.opt.step()
        if record:
            self.times.append((time.perf_counter() - start) * 1e3)

    def median_iqr(self) -> tuple[float, float]:
        q1, _, q3 = statistics.quantiles(self.times, n=4)
        return statistics.median(self.times), q3 - q1


def compare(a: StepTimer, b: StepTimer, repeats: int, warmup: int) -> None:
    """Alternate the two steps, so load changes on a shared machine hit both alike."""
    for i in range(warmup + repeats):
        a.step(record=i >= warmup)
        b.step(record=i >= warmup)


def parse_option(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--supernet-option: expected key=value, got {text!r}")
    return key, yaml.safe_load(value)


def main(argv: list[str] | None = None) -> int:
    from raynas.space import builtin_space_names, load_space
    from raynas.supernets import build_supernet

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spaces", nargs="*", help="space names (default: every built-in space)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (fixed for stable timing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--supernet-option", action="append", default=[], type=parse_option,
                        help="build_supernet keyword, e.g. hypernet=true (repeatable)")
    parser.add_argument("--out", help="also write the rows as Parquet")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    options = dict(args.supernet_option)

    print(f"# train-step overhead, supernet(x, arch) / extract(arch)(x); batch {args.batch}, "
          f"resolution {args.resolution}, {args.threads} thread(s), median of {args.repeats}; "
          f"{platform.processor() or platform.machine()}, {torch.get_num_interop_threads()} interop threads, "
          f"torch {torch.__version__}", file=sys.stderr)
    header = f"{'space':<16} {'arch':<7} {'params':>10} {'supernet ms':>12} {'static ms':>10} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    rows = []
    for name in args.spaces or builtin_space_names():
        space = load_space(name, resolution=args.resolution, num_classes=10)
        torch.manual_seed(args.seed)
        supernet = build_supernet(space, **options).train()
        rng = np.random.default_rng(args.seed)
        x = torch.randn(args.batch, *supernet.input_shape()[1:])
        y = torch.randint(0, 10, (args.batch,))
        for label, arch in (("min", space.min_arch()), ("random", space.sample(rng)), ("max", space.max_arch())):
            static = supernet.extract(arch).train()
            through = StepTimer(lambda t, a=arch, net=supernet: net(t, a), supernet.parameters(), x, y)
            alone = StepTimer(static, static.parameters(), x, y)
            compare(through, alone, args.repeats, args.warmup)
            (sup_ms, sup_iqr), (sta_ms, sta_iqr) = through.median_iqr(), alone.median_iqr()
            params = supernet.cost(arch)["params"]
            row = {"space": name, "arch": label, "arch_json": arch.to_json(), "params": params,
                   "supernet_ms": sup_ms, "supernet_iqr_ms": sup_iqr, "static_ms": sta_ms,
                   "static_iqr_ms": sta_iqr, "ratio": sup_ms / sta_ms, "resolution": args.resolution,
                   "batch": args.batch, "threads": args.threads}
            rows.append(row)
            print(f"{name:<16} {label:<7} {params:>10,} {sup_ms:>12.2f} {sta_ms:>10.2f} {sup_ms / sta_ms:>6.2f}",
                  flush=True)
    ratios = [r["ratio"] for r in rows]
    print(f"median ratio over {len(ratios)} subnets: {statistics.median(ratios):.2f}  (max {max(ratios):.2f})")
    if args.out:
        import pandas as pd

        pd.DataFrame(rows).to_parquet(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
