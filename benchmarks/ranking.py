"""Ranking benchmark: does the supernet rank subnets as training them alone would?

For one space (a reduced NAS-Bench-201 on the embedded `digits`, declared in a YAML the benchmark
writes), it trains every `--archs` subnet from scratch ("standalone"), trains one supernet per
strategy (`uniform`, `fair`, `sandwich`, `focusfair`, `focusfair+hypernet` = focusfair with the
Kshot-Hypernet), evaluates each subnet with its inherited weights after BatchNorm recalibration, and
prints per strategy Kendall's tau (inherited vs standalone accuracy), Spearman's rho, mean
accuracies and the mean gap inherited - standalone. Seed 000 reports tau ~ 0.70 on NAS-Bench-201.

Training runs in this process (one worker, no DDP) with the library's own pieces: the strategy
registry, `StepContext`, the optimizer/scheduler builders and BN recalibration of `raynas.train`;
the Ray Train loop adds distribution, not different arithmetic. All strategies get the same epochs.

    python benchmarks/ranking.py [--out DIR] [--archs 16] [--epochs 30] [--standalone-epochs 10]
        [--standalone-seeds 2] [--strategies uniform,fair,sandwich,focusfair,focusfair+hypernet]

Writes DIR/space.yaml, DIR/train_<strategy>.yaml, DIR/ranking.parquet (one row per strategy x arch)
and DIR/summary.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from scipy.stats import kendalltau, spearmanr

from raynas.data import Batches, EpochBatches, Normalizer, eval_dataset, normalization, train_dataset, train_feed_info
from raynas.space import Arch, load_space
from raynas.supernets import build_supernet
from raynas.train.bn import evaluate_subnet
from raynas.train.config import validate_train_config
from raynas.train.losses import label_loss
from raynas.train.optim import build_scheduler, optimizer_factory
from raynas.train.strategies import build_strategy
from raynas.train.strategies.base import StepContext

# The reduced space: NAS-Bench-201's cell and ops, one cell per stage, narrow, at digits' native 8x8.
# Trained on a 500-image subset of digits' training split: on all of it every subnet reaches 98-99%
# within a few epochs and the ranking would only measure noise.
SPACE = {
    "name": "nb201-digits",
    "family": "nb201",
    "description": "NAS-Bench-201 cell (all 5 ops, 6 edges) with a reduced skeleton for the ranking benchmark",
    "resolution": 8,
    "num_classes": 10,
    "in_channels": 1,
    "channels": [4, 8, 16],
    "cells_per_stage": 1,
    "nodes": 4,
    "ops": ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"],
}

TRAIN_SAMPLES = 500
HYPERNET = {"h": 32, "n": 64, "unit": 16}   # the paper's h and N
STRATEGIES = {
    "uniform": {"strategy": {"name": "uniform"}},
    "fair": {"strategy": {"name": "fair"}},
    "sandwich": {"strategy": {"name": "sandwich", "num_random": 2}},
    # beta's learning rate is scaled up from DARTS' 3e-4 (the paper trains ~59k steps, this ~240) and the
    # equal-coefficient warm-up is 3 of 30 epochs (paper: 5 of 300).
    "focusfair": {"strategy": {"name": "focusfair", "warmup": "equal", "warmup_epochs": 3, "arch_lr": 0.01}},
    "focusfair+hypernet": {"strategy": {"name": "focusfair", "warmup": "equal", "warmup_epochs": 3,
                                        "arch_lr": 0.01},
                           "supernet": {"hypernet": HYPERNET}},
}


def train_config(space_path: Path, epochs: int, extra: dict[str, Any]) -> dict[str, Any]:
    cfg = {
        "name": "ranking", "space": str(space_path), "epochs": epochs, "seed": 0,
        "data": {"name": "digits", "batch_size": 64, "eval_batch_size": 256,
                 "max_train_samples": TRAIN_SAMPLES},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        "scheduler": {"name": "cosine"},
        "label_smoothing": 0.0,
        "eval": {"bn_samples": 2048},
        **copy.deepcopy(extra),
    }
    return validate_train_config(cfg)


def is_live(space, arch: Arch) -> bool:
    """Whether the cell's output depends on its input (some path of non-`none` ops reaches the last node)."""
    live = {0}
    for j in range(1, space.num_nodes):
        if any(i in live and arch[f"edge_{j}_{i}"] != "none" for i in range(j)):
            live.add(j)
    return space.num_nodes - 1 in live


def pick_archs(space, count: int, seed: int) -> list[Arch]:
    """`count` distinct random archs whose cell is not constant (dead cells all score chance level)."""
    rng = np.random.default_rng(seed)
    archs: list[Arch] = []
    while len(archs) < count:
        arch = space.sample(rng)
        if arch not in archs and is_live(space, arch):
            archs.append(arch)
    return archs


class Data:
    """The benchmark's data, through Ray Data as in training (raynas.data), read by this one process."""

    def __init__(self, cfg: dict[str, Any], space):
        self.cfg = cfg["data"]
        self.resolution, self.channels = space.resolution, space.in_channels
        self.normalize = Normalizer(*normalization(self.cfg, self.channels))
        eval_batch = self.cfg["eval_batch_size"]
        self.bn = Batches(eval_dataset(self.cfg, "train", self.resolution, self.channels), eval_batch, "cpu",
                          self.normalize)
        self.val = Batches(eval_dataset(self.cfg, "val", self.resolution, self.channels), eval_batch, "cpu",
                           self.normalize)

    def train_batches(self, seed: int) -> EpochBatches:
        """Full batches of the training split, in a new seeded order (and augmentation) each epoch."""
        dataset = train_dataset(self.cfg, self.resolution, self.channels, seed=seed)
        return EpochBatches(dataset, train_feed_info(dataset.context), self.cfg["batch_size"], "cpu", self.normalize)

    def eval_loaders(self):
        return self.bn, self.val


def train_supernet(cfg: dict[str, Any], space, data: Data) -> tuple[torch.nn.Module, float]:
    """The per-worker loop of `raynas.train.loop` on one process (no DDP, fp32, no checkpoints)."""
    torch.manual_seed(cfg["seed"])
    supernet = build_supernet(space, **cfg["supernet"])
    strategy = build_strategy(cfg["strategy"], space, cfg["seed"])
    module = strategy.prepare_model(supernet)
    batches = data.train_batches(cfg["seed"])
    optimizers = strategy.configure_optimizers(module, optimizer_factory(cfg["optimizer"]))
    schedulers = [build_scheduler(o, cfg["scheduler"], batches.steps, cfg["epochs"]) for o in optimizers.values()]
    ctx = StepContext(module, module, optimizers, device=torch.device("cpu"), amp_dtype=None,
                      scaler=torch.amp.GradScaler("cpu", enabled=False), label_smoothing=cfg["label_smoothing"],
                      grad_clip=cfg["optimizer"]["grad_clip"], world_size=1)
    ctx.steps_per_epoch, ctx.num_epochs = batches.steps, cfg["epochs"]
    started = time.perf_counter()
    for epoch in range(cfg["epochs"]):
        strategy.on_epoch_start(epoch, cfg["epochs"])
        module.train()
        ctx.epoch = epoch
        losses = []
        for step, (x, y) in enumerate(batches.epoch(epoch)):
            ctx.step = step
            losses.append(strategy.train_step(x, y, ctx)["loss"])
            for sched in schedulers:
                sched.step()
            ctx.global_step += 1
        print(f"  epoch {epoch + 1}/{cfg['epochs']} loss {np.mean(losses):.4f} "
              f"({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)
    return strategy.export_supernet(module), time.perf_counter() - started


def train_standalone(cfg: dict[str, Any], space, arch: Arch, data: Data) -> float:
    """Train `arch` alone from a fresh initialisation; top-1 validation accuracy."""
    torch.manual_seed(cfg["seed"])
    subnet = build_supernet(space).extract(arch).train()
    batches = data.train_batches(cfg["seed"])
    opt = optimizer_factory(cfg["optimizer"])(subnet.parameters())
    sched = build_scheduler(opt, cfg["scheduler"], batches.steps, cfg["epochs"])
    for epoch in range(cfg["epochs"]):
        for x, y in batches.epoch(epoch):
            loss = label_loss(y, cfg["label_smoothing"])(subnet(x))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    subnet.eval()
    _, val_loader = data.eval_loaders()
    correct = total = 0
    with torch.no_grad():
        for x, y in val_loader:
            correct += int((subnet(x).argmax(-1) == y).sum())
            total += len(y)
    return correct / total


def inherited_accuracies(supernet: torch.nn.Module, archs: list[Arch], data: Data, bn_samples: int) -> list[float]:
    bn_loader, val_loader = data.eval_loaders()
    return [evaluate_subnet(supernet, arch, bn_loader, val_loader, bn_samples) for arch in archs]


def summarise(standalone: np.ndarray, inherited: np.ndarray) -> dict[str, float]:
    tau = kendalltau(inherited, standalone).statistic
    rho = spearmanr(inherited, standalone).statistic
    return {"kendall_tau": float(tau) if math.isfinite(tau) else float("nan"),
            "spearman_rho": float(rho) if math.isfinite(rho) else float("nan"),
            "mean_inherited": float(inherited.mean()), "mean_standalone": float(standalone.mean()),
            "mean_gap": float((inherited - standalone).mean()),
            "best_inherited": float(inherited.max()), "best_standalone": float(standalone.max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/ranking", help="output directory")
    parser.add_argument("--archs", type=int, default=16, help="subnets ranked (>= 15)")
    parser.add_argument("--epochs", type=int, default=30, help="supernet epochs (every strategy)")
    parser.add_argument("--standalone-epochs", type=int, default=10, help="epochs of each standalone subnet")
    parser.add_argument("--standalone-seeds", type=int, default=2,
                        help="standalone trainings per subnet (averaged; 2+ also gives the noise ceiling)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help=f"subset of {list(STRATEGIES)}")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arch sample")
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or args.archs < 2 or args.standalone_seeds < 1:
        parser.error(f"--strategies: unknown {unknown}; allowed: {list(STRATEGIES)}" if unknown
                     else "--archs: need at least 2; --standalone-seeds: at least 1")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    space_path = out / "space.yaml"
    space_path.write_text(yaml.safe_dump(SPACE, sort_keys=False))
    space = load_space(str(space_path))
    archs = pick_archs(space, args.archs, args.seed)
    data = Data(train_config(space_path, args.standalone_epochs, {}), space)
    started = time.perf_counter()

    # Standalone results are kept next to the others and reused when the same subnets, epochs and seeds
    # are asked for again (e.g. re-running one strategy).
    cache_path = out / "standalone.json"
    cache_key = {"space": SPACE, "train_samples": TRAIN_SAMPLES, "archs": [a.to_json() for a in archs],
                 "epochs": args.standalone_epochs, "seeds": args.standalone_seeds}
    cached = json.loads(cache_path.read_text()) if cache_path.is_file() else None
    if cached is not None and cached["key"] == cache_key:
        per_seed = np.array(cached["accuracy"])
        standalone_s = cached["seconds"]
        print(f"standalone: reusing {cache_path}", file=sys.stderr, flush=True)
    else:
        print(f"standalone: {len(archs)} subnets x {args.standalone_seeds} seeds x {args.standalone_epochs} "
              "epochs", file=sys.stderr, flush=True)
        per_seed = np.zeros((args.standalone_seeds, len(archs)))
        for seed in range(args.standalone_seeds):
            cfg = train_config(space_path, args.standalone_epochs, {"seed": seed})
            for i, arch in enumerate(archs):
                per_seed[seed, i] = train_standalone(cfg, space, arch, data)
                print(f"  seed {seed} {i + 1}/{len(archs)} {space.arch_str(arch)} {100 * per_seed[seed, i]:.1f}%",
                      file=sys.stderr, flush=True)
        standalone_s = time.perf_counter() - started
        cache_path.write_text(json.dumps({"key": cache_key, "accuracy": per_seed.tolist(), "seconds": standalone_s}))
    standalone = per_seed.mean(0)
    # How well one standalone training ranks like another: the ceiling for any supernet on this setup.
    ceiling = (float(np.mean([kendalltau(per_seed[a], per_seed[b]).statistic
                              for a in range(len(per_seed)) for b in range(a + 1, len(per_seed))]))
               if len(per_seed) > 1 else None)

    rows, summary = [], {}
    for name in names:
        cfg = train_config(space_path, args.epochs, STRATEGIES[name])
        (out / f"train_{name.replace('+', '_')}.yaml").write_text(yaml.safe_dump(
            {k: v for k, v in cfg.items() if k != "storage_path"}, sort_keys=False))
        print(f"supernet: {name}, {args.epochs} epochs", file=sys.stderr, flush=True)
        supernet, train_s = train_supernet(cfg, space, data)
        inherited = np.array(inherited_accuracies(supernet, archs, data, cfg["eval"]["bn_samples"]))
        summary[name] = {**summarise(standalone, inherited), "train_s": train_s}
        for i, (arch, acc_i) in enumerate(zip(archs, inherited)):
            cost = space.cost(arch)
            rows.append({"strategy": name, "arch": arch.to_json(), "arch_str": space.arch_str(arch),
                         "params": cost["params"], "macs": cost["macs"], "inherited_acc": float(acc_i),
                         "standalone_acc": float(standalone[i]),
                         **{f"standalone_acc_seed{s}": float(per_seed[s, i]) for s in range(len(per_seed))}})
        pd.DataFrame(rows).to_parquet(out / "ranking.parquet", index=False)

    meta = {"space": SPACE, "train_samples": TRAIN_SAMPLES, "archs": len(archs), "epochs": args.epochs,
            "standalone_epochs": args.standalone_epochs, "standalone_seeds": args.standalone_seeds,
            "standalone_tau_between_seeds": ceiling, "threads": args.threads, "standalone_s": standalone_s,
            "total_s": time.perf_counter() - started, "hypernet": HYPERNET, "strategies": summary}
    (out / "summary.json").write_text(json.dumps(meta, indent=2))

    print(f"\nKendall tau, inherited (BN recalibrated) vs standalone top-1 on digits val, {len(archs)} subnets of "
          f"{SPACE['name']} ({args.epochs} supernet epochs; standalone {args.standalone_epochs} epochs, mean of "
          f"{args.standalone_seeds} seeds)")
    if ceiling is not None:
        print(f"noise ceiling: tau between standalone seeds {ceiling:.3f}")
    print(f"{'strategy':<20}{'tau':>7}{'rho':>7}{'inherited':>11}{'standalone':>12}{'gap':>8}{'train s':>9}")
    for name, s in summary.items():
        print(f"{name:<20}{s['kendall_tau']:>7.3f}{s['spearman_rho']:>7.3f}{100 * s['mean_inherited']:>10.1f}%"
              f"{100 * s['mean_standalone']:>11.1f}%{100 * s['mean_gap']:>7.1f}%{s['train_s']:>9.0f}")
    print(f"standalone training {standalone_s:.0f}s (when it ran), this run {meta['total_s']:.0f}s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
