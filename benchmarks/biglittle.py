"""Big/little dynamic inference on `digits` (seed 002's critical baseline and its training ablations).

    python benchmarks/biglittle.py [--epochs 10] [--seeds 3] [--studies cascade,distill,progressive]
                                   [--couplings nested,sibling] [--out runs/bench_biglittle] [--quick]

Studies (`--studies`, all by default):
* cascade: co-trained pairs vs an independently trained cascade of the same two architectures, at matched
  E[MACs], one seed, with every router and an ONNX deployment:
  1. Co-train a big/little supernet per coupling (strategy `biglittle`: CE(big) + a CE(little)
     + b KD(little <- big, T) + g L_router with sandwich pairs and a learned router) through Ray Train.
  2. Train the same big (the space's largest subnet) and the same little (its smallest) alone (strategy
     `single-arch`) with the same epochs, optimizer and data: the independently trained cascade.
  3. On the validation split (BN recalibrated per model), sweep tau for each co-trained pair under the
     confidence cascade, the learned router and the difficulty router (both fitted to the pair on the
     training images), and for the independent cascade (confidence); plus always-big, always-little,
     random routing (ratio swept) and oracle routing. E[MACs] = p MACs(little) + (1 - p) MACs(big)
     (seed 002); E[latency] from a flops latency model calibrated on this CPU.
  4. Export the first coupling's pair as a confidence cascade to ONNX and run it per input in onnxruntime.
* distill: the distillation ablation of seed 002 §5.4 (Table 3/6), nested co-training with `distill: none`
  (no KD term), `logits` (the beta KD term) and `logits+features` (plus attention transfer between big's and
  little's stage outputs), each over `--seeds` seeds.
* progressive: OFA progressive shrinking (phases full -> kernel -> depth -> width, the epochs split between
  them) vs single-stage sandwich co-training (`logits`), at equal epochs, over the same seeds; the
  co-trained vs independent cascade is re-measured over those seeds too.
The seeded studies evaluate the sandwich pair (largest big, smallest little) under the confidence cascade:
big, little and cascade accuracy at matched E[MACs], printed as mean +- std over the seeds (n) and as
per-seed differences to single-stage `logits`. Runs are named by what they train and reused when present.
Prints the figures and writes results.json and biglittle.png (cascade study).

To fit a shared 2-core CPU the space is pipelines/configs/biglittle_space_digits.yaml
(the mbv3-biglittle family with a tiny channel table) with depth {1, 2}, kernel {3, 5}, expansion {1, 2, 4}
(`--expand-choices 2,4` drops expansion 1, whose no-expansion-conv blocks share the depthwise weights in
another role and interfere with weight sharing; see the note printed with the results). `--quick`: 4 epochs,
2 seeds, the nested coupling only, 256 BN samples.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raynas.biglittle.costs import PairCostModel, PieceLatency, calibrated_proxy_latency  # noqa: E402
from raynas.biglittle.coupling import CoupledSupernet, load_coupled  # noqa: E402
from raynas.biglittle.deploy import export_pair, run_routed  # noqa: E402
from raynas.biglittle.evaluate import eval_data, fit_router, predict_pair  # noqa: E402
from raynas.biglittle.metrics import (  # noqa: E402
    PairPredictions,
    accuracy_at_cost,
    baseline_decisions,
    default_taus,
    routing_metrics,
    tau_curve,
)
from raynas.biglittle.routers import ConfidenceRouter, DifficultyRouter  # noqa: E402
from raynas.data import Batches, Normalizer, eval_dataset, normalization  # noqa: E402
from raynas.supernets.checkpoint import load_supernet  # noqa: E402
from raynas.train.bn import recalibrate_bn  # noqa: E402

DATA = {"name": "digits"}


def log(msg: str) -> None:
    print(f"[biglittle bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bench_space(out: Path, expand_choices: list[int]) -> Path:
    cfg = yaml.safe_load((ROOT / "pipelines/configs/biglittle_space_digits.yaml").read_text())
    cfg.update(name="mbv3-biglittle-digits-bench", depth_choices=[1, 2], kernel_choices=[3, 5],
               expand_choices=expand_choices)
    path = out / "space.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def train_run(base: dict, name: str, strategy: dict, storage: Path) -> Path:
    from raynas.train.trainer import train

    cfg = copy.deepcopy(base)
    cfg.update(name=name, storage_path=str(storage), strategy=strategy)
    started = time.time()
    result = train(cfg, quiet=True)
    log(f"trained {name} in {time.time() - started:.0f}s")
    return result.supernet_path


@torch.no_grad()
def independent_logits(path: Path, arch_name: str, data) -> np.ndarray:
    net = load_supernet(path)
    arch = net.space.max_arch() if arch_name == "max" else net.space.min_arch()
    recalibrate_bn(net, arch, data.bn_loader, data.bn_samples)
    return torch.cat([net(x, arch) for x, _ in data.val_loader]).numpy()


def random_curve(pred: PairPredictions, costs, ratios, seeds: int = 5) -> list[dict]:
    rows = []
    for p in ratios:
        runs = [routing_metrics(pred.little_correct, pred.big_correct,
                                baseline_decisions("random", pred, p, np.random.default_rng(s))) for s in range(seeds)]
        rows.append({"p": float(p), "accuracy": float(np.mean([r["accuracy"] for r in runs])),
                     "routing_ratio": float(np.mean([r["routing_ratio"] for r in runs]))})
        rows[-1].update(costs.summary(rows[-1]["routing_ratio"]))
    return rows


def fixed(pred: PairPredictions, name: str, costs) -> dict:
    d = baseline_decisions(name, pred)
    return routing_metrics(pred.little_correct, pred.big_correct, d, pred.little_probs, pred.labels, costs)


ROUTER_STYLE = {"confidence": "-", "learned router": "--", "difficulty router": ":"}
COUPLING_COLOR = {"nested": "C0", "sibling": "C2", "partial": "C4"}


def plot(curves: dict, points: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=130)
    for name, rows in curves.items():
        if name.startswith("independent"):
            color, ls, lw = "C1", "-", 2.2
        elif "random" in name:
            color, ls, lw = "grey", "-.", 1.0
        else:
            coupling, router = name.split(" co-trained + ")
            color, ls, lw = COUPLING_COLOR.get(coupling, "k"), ROUTER_STYLE.get(router, "-"), 1.5
        pts = sorted((r["e_macs"] / 1e3, 100 * r["accuracy"]) for r in rows)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=ls, color=color, lw=lw, label=name)
    markers = {"always-big": "s", "always-little": "v", "oracle": "*"}
    for who, by_name in points.items():
        color = "C1" if who == "independent" else COUPLING_COLOR.get(who, "k")
        for name, m in by_name.items():
            ax.scatter(m["e_macs"] / 1e3, 100 * m["accuracy"], marker=markers[name], color=color, s=55, zorder=3,
                       label=f"{who} {name}" if name != "always-little" else None)
    ax.set_xlabel("E[MACs] = p MACs(little) + (1-p) MACs(big)   (thousands)")
    ax.set_ylabel("routed top-1 accuracy, digits val (%)")
    ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]))
    ax.set_title("big/little on digits: co-trained pairs vs independently trained cascade", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def evaluate_coupled(path: Path, data, train_loader, latency) -> dict:
    """Curves of one co-trained coupled pair (extreme pair) under each router, and its fixed points."""
    model = load_coupled(path)
    pair = model.pair_space.extreme_pair()  # big = the space's largest subnet, little = its smallest
    out: dict = {"coupling": model.coupling, "router_fit": {}}
    learned = model.router
    preds, costs = {}, {}
    for name, router in (("learned router", learned), ("difficulty router", DifficultyRouter())):
        model.router = router
        out["router_fit"][name] = fit_router(model, pair, data, train_loader, epochs=60)
        preds[name] = predict_pair(model, pair, data)
        costs[name] = PairCostModel(model, latency).costs(pair)
    model.router = ConfidenceRouter()
    preds["confidence"] = dataclasses.replace(preds["learned router"], router_score=None)  # little's max softmax
    costs["confidence"] = PairCostModel(model, latency).costs(pair)
    out["curves"] = {r: tau_curve(preds[r], default_taus(preds[r], 25), costs[r]) for r in preds}
    out["random"] = random_curve(preds["confidence"], costs["confidence"], np.linspace(0, 1, 11))
    out["points"] = {n: fixed(preds["confidence"], n, costs["confidence"])
                     for n in ("always-big", "always-little", "oracle")}
    out["model"], out["pair"], out["costs"] = model, pair, costs["confidence"]
    return out


STUDIES = ("cascade", "distill", "progressive")
DISTILLS = ("none", "logits", "logits+features")


class Runs:
    """Training runs by name: each trained once (a run already in the storage resumes, i.e. is reused)."""

    def __init__(self, base: dict, storage: Path):
        self.base, self.storage = base, storage
        self.paths: dict[str, Path] = {}
        self.seconds: dict[str, float] = {}

    def get(self, name: str, strategy: dict, seed: int) -> Path:
        if name not in self.paths:
            t0 = time.time()
            self.paths[name] = train_run({**self.base, "seed": seed}, name, strategy, self.storage)
            self.seconds[name] = time.time() - t0
        return self.paths[name]

    def cotrained(self, coupling: str, seed: int, distill: str = "logits", progressive: dict | None = None) -> Path:
        strategy = {**self.base["strategy"], "coupling": coupling, "distill": distill}
        name = f"cotrained_{coupling}_{distill.replace('+', '_')}_s{seed}"
        if progressive is not None:
            strategy["progressive"] = progressive
            name += "_progressive"
        return self.get(name, strategy, seed)

    def independent(self, which: str, seed: int) -> Path:
        arch = {"big": "max", "little": "min"}[which]
        return self.get(f"independent_{which}_s{seed}", {"name": "single-arch", "arch": arch}, seed)


def progressive_schedule(epochs: int) -> dict:
    """OFA's phases over `epochs`: full -> kernel -> depth -> width, as even as possible (later phases get the
    remainder); without the full-network phase below 4 epochs."""
    phases = ["full", "kernel", "depth", "width"] if epochs >= 4 else ["kernel", "depth", "width"]
    if epochs < len(phases):
        raise SystemExit(f"--epochs: progressive shrinking needs >= 3 epochs, got {epochs}")
    counts = [epochs // len(phases)] * len(phases)
    for i in range(epochs % len(phases)):
        counts[-1 - i] += 1
    return {"phases": phases, "epochs": counts}


def cascade_figures(pred: PairPredictions, costs, targets: list[float]) -> dict:
    """Big, little and confidence-cascade accuracy (at each E[MACs] target) of one pair's predictions."""
    curve = tau_curve(pred, default_taus(pred, 25), costs)
    at = accuracy_at_cost(curve, "e_macs", targets)
    big, little = (fixed(pred, n, costs) for n in ("always-big", "always-little"))
    return {"big": big["accuracy"], "little": little["accuracy"], "ece_little": little["ece_little"],
            **{f"cascade@{i}": a for i, a in enumerate(at)}}


def coupled_figures(path: Path, data, targets: list[float]) -> dict:
    model = load_coupled(path)
    pair = model.pair_space.extreme_pair()
    pred = dataclasses.replace(predict_pair(model, pair, data), router_score=None)  # confidence cascade
    return cascade_figures(pred, PairCostModel(model).costs(pair), targets)


def mean_std(values: list[float]) -> str:
    v = np.asarray(values, float) * 100
    return f"{v.mean():6.2f} +- {v.std(ddof=1) if len(v) > 1 else 0.0:5.2f}"


def seeded_studies(args, runs: Runs, studies: list[str], data, costs_ind, seeds: list[int]) -> dict:
    """The distillation ablation and progressive shrinking vs single stage, co-trained vs independent, per seed."""
    macs_l, macs_b = costs_ind.model("little"), costs_ind.model("big")
    budgets = (0.25, 0.5)
    targets = [macs_l + f * (macs_b - macs_l) for f in budgets]
    variants = {"single-stage logits": lambda seed: runs.cotrained("nested", seed)}
    if "distill" in studies:
        for distill in ("none", "logits+features"):
            variants[f"single-stage {distill}"] = lambda seed, d=distill: runs.cotrained("nested", seed, d)
    if "progressive" in studies:
        schedule = progressive_schedule(args.epochs)
        variants["progressive logits"] = lambda seed: runs.cotrained("nested", seed, progressive=schedule)
    figures: dict[str, list[dict]] = {name: [] for name in [*variants, "independent cascade"]}
    labels = np.concatenate([y.numpy() for _, y in data.val_loader])
    for seed in seeds:
        for name, run in variants.items():
            figures[name].append(coupled_figures(run(seed), data, targets))
            log(f"seed {seed} {name}: {figures[name][-1]}")
        pred = PairPredictions(labels, independent_logits(runs.independent("big", seed), "max", data),
                               independent_logits(runs.independent("little", seed), "min", data))
        figures["independent cascade"].append(cascade_figures(pred, costs_ind, targets))
    return {"seeds": seeds, "budgets": budgets, "targets": targets, "figures": figures,
            "schedule": progressive_schedule(args.epochs) if "progressive" in studies else None}


def print_seeded(res: dict, runs: Runs, epochs: int) -> None:
    n = len(res["seeds"])
    keys = ["big", "little", *(f"cascade@{i}" for i in range(len(res["budgets"])))]
    heads = ["big", "little", *(f"cascade@{int(100 * b)}%" for b in res["budgets"])]
    print(f"\nseeded studies: nested pair (largest big, smallest little), confidence cascade, {epochs} epochs, "
          f"n = {n} seeds {res['seeds']}; accuracy % on digits val, mean +- std over seeds")
    print(f"  cascade@X%: best accuracy at E[MACs] <= MACs(little) + X% (MACs(big) - MACs(little)) "
          f"({', '.join(f'{t / 1e3:.1f}K' for t in res['targets'])})")
    if res["schedule"]:
        print(f"  progressive: phases {res['schedule']['phases']}, epochs {res['schedule']['epochs']}")
    print(f"{'':30}" + "".join(f"{h:>18}" for h in heads))
    for name, rows in res["figures"].items():
        print(f"{name:30}" + "".join(f"{mean_std([r[k] for r in rows]):>18}" for k in keys))
    ref = res["figures"]["single-stage logits"]
    print("per-seed difference to single-stage logits (points, mean +- std):")
    for name, rows in res["figures"].items():
        if name == "single-stage logits":
            continue
        print(f"{name:30}" + "".join(f"{mean_std([r[k] - b[k] for r, b in zip(rows, ref)]):>18}" for k in keys))
    by_kind: dict[str, list[float]] = {}
    for name, sec in runs.seconds.items():
        kind = name.rsplit("_s", 1)[0] + ("_progressive" if name.endswith("_progressive") else "")
        by_kind.setdefault(kind, []).append(sec)
    print("training time per run (s, mean over the runs trained now; the machine is shared): " + ", ".join(
        f"{k} {np.mean(v):.0f} (n={len(v)})" for k, v in sorted(by_kind.items())))


def cascade_study(args, runs: Runs, couplings: list[str], data, train_loader, latency, reference, costs_ind,
                  space, out: Path) -> dict:
    co_paths = {c: runs.cotrained(c, args.seed) for c in couplings}
    big_path, little_path = runs.independent("big", args.seed), runs.independent("little", args.seed)
    pred_ind = PairPredictions(np.concatenate([y.numpy() for _, y in data.val_loader]),
                               independent_logits(big_path, "max", data), independent_logits(little_path, "min", data))

    curves = {"independent + confidence": tau_curve(pred_ind, default_taus(pred_ind, 25), costs_ind)}
    points = {"independent": {n: fixed(pred_ind, n, costs_ind) for n in ("always-big", "always-little", "oracle")}}
    evaluated = {}
    for coupling in couplings:
        ev = evaluated[coupling] = evaluate_coupled(co_paths[coupling], data, train_loader, latency)
        for router, rows in ev["curves"].items():
            curves[f"{coupling} co-trained + {router}"] = rows
        points[coupling] = ev["points"]
    curves[f"{couplings[0]} co-trained + random routing"] = evaluated[couplings[0]]["random"]

    macs_l, macs_b = costs_ind.model("little"), costs_ind.model("big")
    targets = [macs_l + f * (macs_b - macs_l) for f in (0.1, 0.25, 0.5, 0.75)]
    matched = {name: accuracy_at_cost(rows, "e_macs", targets) for name, rows in curves.items()}

    # deployment: the first coupling's pair as a confidence cascade, tau = best score on val (acc - 0.1 E/big)
    first = evaluated[couplings[0]]
    conf_rows = first["curves"]["confidence"]
    best = max(conf_rows, key=lambda r: r["accuracy"] - 0.1 * r["e_macs"] / r["macs_big"])
    deploy_dir = out / "deploy"
    export_pair(first["model"], first["pair"], data, deploy_dir, best["tau"], latency=latency)
    deployed = run_routed(deploy_dir, DATA)
    plot(curves, points, out / "biglittle.png")

    print(f"\ncascade study: big/little on digits ({len(pred_ind.labels)} val images), {args.epochs} epochs per run, "
          f"seed {args.seed}")
    print(f"pair: big = largest subnet ({macs_b / 1e3:.1f}K MACs, {costs_ind.model('big', 'params') / 1e3:.1f}K "
          f"params), little = smallest ({macs_l / 1e3:.1f}K MACs, {costs_ind.model('little', 'params') / 1e3:.1f}K "
          "params)")
    for c, ev in evaluated.items():
        print(f"  {c}: MACs little {ev['costs'].model('little') / 1e3:.1f}K, big {ev['costs'].model('big') / 1e3:.1f}K "
              f"(shared trunk: {ev['costs'].has_trunk})")
    whos = ["independent", *couplings]
    print(f"{'':16}" + "".join(f"{w:>14}" for w in whos))
    for name in ("always-big", "always-little", "oracle"):
        print(f"{name:16}" + "".join(f"{100 * points[w][name]['accuracy']:13.2f}%" for w in whos))
    print(f"{'ECE little':16}" + "".join(f"{points[w]['always-little']['ece_little']:14.4f}" for w in whos))
    print("\naccuracy (%) at matched E[MACs] (best point at or below the budget):")
    print(f"{'E[MACs] budget':44}" + "".join(f"{t / 1e3:>10.1f}K" for t in targets))
    for name, accs in matched.items():
        print(f"{name:44}" + "".join(f"{100 * a:10.2f}%" if a == a else f"{'-':>11}" for a in accs))
    print("\ncurves (tau: accuracy %, routing ratio, E[MACs] K, E[latency] ms deployed):")
    for name, rows in curves.items():
        if "random" in name:
            continue
        rows = rows[:: max(1, len(rows) // 6)]
        print(f"  {name}: " + "; ".join(
            f"{r['tau']:.3f}: {100 * r['accuracy']:.1f}, {r['routing_ratio']:.2f}, {r['e_macs'] / 1e3:.1f}, "
            f"{r['e_latency_ms']:.3f}" for r in rows))
    print(f"\ndeployed ({couplings[0]}, ONNX, confidence cascade, tau {deployed['tau']:.3f}): accuracy "
          f"{100 * deployed['accuracy']:.2f}%, routing ratio {deployed['routing_ratio']:.2f}, latency per input "
          f"mean {deployed['mean_latency_ms']:.3f} ms / median {deployed['latency_ms']['median']:.3f} ms "
          f"(always-big mean/median {deployed['always_big']['mean_latency_ms']:.3f}/"
          f"{deployed['always_big']['median_latency_ms']:.3f} ms, always-little "
          f"{deployed['always_little']['mean_latency_ms']:.3f}/{deployed['always_little']['median_latency_ms']:.3f} "
          "ms); predicted E[latency] "
          f"{deployed['predicted_e_latency_ms']:.3f} ms ({deployed['predicted_by']}), from per-piece ONNX timings "
          f"{deployed.get('piece_timed_e_latency_ms', float('nan')):.3f} ms")
    return {
        "pair": {"big": dict(space.max_arch()), "little": dict(space.min_arch())},
        "standalone": {"macs_little": macs_l, "macs_big": macs_b, "params_little": costs_ind.model("little", "params"),
                       "params_big": costs_ind.model("big", "params"),
                       "latency_little_ms": costs_ind.model("little", "latency_ms"),
                       "latency_big_ms": costs_ind.model("big", "latency_ms")},
        "coupled_costs": {c: {"macs_little": ev["costs"].model("little"), "macs_big": ev["costs"].model("big")}
                          for c, ev in evaluated.items()},
        "router_fit": {c: ev["router_fit"] for c, ev in evaluated.items()},
        "points": points, "matched_e_macs": {"targets": targets, **matched}, "curves": curves,
        "deployed": deployed, "val_inputs": int(len(pred_ind.labels)),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=None, help="epochs per run (10; --quick 4)")
    ap.add_argument("--studies", default=",".join(STUDIES), help=f"any of {','.join(STUDIES)}")
    ap.add_argument("--seeds", type=int, default=None, help="seeds of the seeded studies, n (3; --quick 2)")
    ap.add_argument("--couplings", default=None, help="co-trained couplings of the cascade study (nested,sibling; "
                    "--quick nested)")
    ap.add_argument("--out", default="runs/bench_biglittle", help="runs, results.json, biglittle.png, deploy/")
    ap.add_argument("--seed", type=int, default=0, help="the cascade study's seed and the first of --seeds")
    ap.add_argument("--bn-samples", type=int, default=None, help="BN recalibration images (512; --quick 256)")
    ap.add_argument("--expand-choices", default="1,2,4",
                    help="expansion choices of the benchmark space (1 = no expansion conv, as the seed allows)")
    ap.add_argument("--steps-per-epoch", type=int, default=None, help="cap on steps per epoch (smoke tests)")
    ap.add_argument("--quick", action="store_true", help="defaults of 4 epochs, 2 seeds, nested only, 256 BN samples")
    args = ap.parse_args(argv)
    defaults = {"epochs": 4, "seeds": 2, "couplings": "nested", "bn_samples": 256} if args.quick else \
        {"epochs": 10, "seeds": 3, "couplings": "nested,sibling", "bn_samples": 512}
    given = vars(args)  # the namespace's own dict: filling it fills `args`
    for key, value in defaults.items():  # what the command line leaves out
        if given[key] is None:
            given[key] = value
    studies = args.studies.split(",")
    unknown = sorted(set(studies) - set(STUDIES))
    if unknown:
        ap.error(f"--studies: unknown {unknown}; allowed: {list(STUDIES)}")
    started = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    couplings = args.couplings.split(",")

    from raynas.hw.devices import init_local_ray

    init_local_ray(num_cpus=2)  # a fresh local Ray, never another session's cluster

    base = yaml.safe_load((ROOT / "pipelines/configs/biglittle_digits.yaml").read_text())
    expand_choices = [int(e) for e in args.expand_choices.split(",")]
    base.update(space=str(bench_space(out, expand_choices)), epochs=args.epochs, seed=args.seed,
                eval={"bn_samples": args.bn_samples, "num_random": 0, "every": 0}, steps_per_epoch=args.steps_per_epoch)
    runs = Runs(base, out / "runs")
    # the standalone archs' costs, from a reference coupled model of the benchmark space (no training needed)
    from raynas.space import load_space

    space = load_space(base["space"], num_classes=10)
    data = eval_data(DATA, space.resolution, space.in_channels, args.bn_samples)
    reference = CoupledSupernet(space, "nested", router="confidence").eval()
    results: dict = {"epochs": args.epochs, "studies": studies}
    if "cascade" in studies:
        train_loader = Batches(eval_dataset(DATA, "train", space.resolution, space.in_channels), 256, "cpu",
                               Normalizer(*normalization(DATA, space.in_channels)))
        calib_archs = [space.min_arch(), space.max_arch()] + [space.sample(np.random.default_rng(i)) for i in range(4)]
        latency = PieceLatency(calibrated_proxy_latency(reference.big_net, calib_archs))
        costs_ind = PairCostModel(reference, latency).costs(reference.pair_space.extreme_pair())
        results["cascade"] = cascade_study(args, runs, couplings, data, train_loader, latency, reference, costs_ind,
                                           space, out)
    seeded = [s for s in studies if s != "cascade"]
    if seeded:
        costs_ind = PairCostModel(reference).costs(reference.pair_space.extreme_pair())
        seeds = list(range(args.seed, args.seed + args.seeds))
        results["seeded"] = seeded_studies(args, runs, seeded, data, costs_ind, seeds)
        print_seeded(results["seeded"], runs, args.epochs)
    results["timings_s"] = {**runs.seconds, "total": time.time() - started}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    print(f"\ntotal {time.time() - started:.0f}s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
