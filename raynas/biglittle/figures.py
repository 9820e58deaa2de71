"""The analysis directory of one routed pair (seed 002 Figures 2-5, Table 10): PNG figures and the Parquet
tables they are drawn from, written through raynas.storage (a local path or a URI).

  reliability.png / .parquet        reliability diagram of little's confidence (and of a pre-router's score
                                    against its target: little right or big wrong too), ECE in the title
  exit_histogram.png                per class: inputs answered by little vs sent to big, at the pair's tau
  exit_rates.parquet / .md          per-class exit rate and accuracy of little, big and the routed pair
  tau_sensitivity.png / .parquet    accuracy and E[MACs] over a grid of thresholds
  latency_macs.png / .parquet       measured latency vs MACs of exported pieces, one panel per device
  latency_macs_fit.parquet          per device and precision: Pearson and Spearman of MACs vs latency
  analysis.md                       the figures and tables in one page
The computations are raynas.biglittle.analysis; this module only draws and writes.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: cluster nodes have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from raynas import storage  # noqa: E402
from raynas.biglittle import analysis  # noqa: E402
from raynas.biglittle.costs import PairCosts  # noqa: E402
from raynas.biglittle.metrics import PairPredictions, oracle_decisions  # noqa: E402
from raynas.report.pareto_report import markdown_table  # noqa: E402

DEFAULT_TAU_GRID = tuple(np.round(np.linspace(0.0, 1.0, 21), 4))
NO_MEASUREMENTS = ("no latency-vs-MACs scatter: no measured exports given (--models DIR written by "
                   "`raynas biglittle export` without --no-measure)")


def _png(fig, location: str) -> str:
    png = io.BytesIO()
    fig.tight_layout()
    fig.savefig(png, format="png")
    plt.close(fig)
    return storage.write_bytes(location, png.getbuffer())


def reliability_tables(pred: PairPredictions) -> dict[str, pd.DataFrame]:
    """Little's softmax confidence against little being right; a pre-router's score against its target."""
    tables = {"little_confidence": analysis.reliability(pred.confidence, pred.little_correct)}
    if pred.router_score is not None:
        tables["router_score"] = analysis.reliability(
            pred.router_score, oracle_decisions(pred.little_correct, pred.big_correct))
    return tables


def plot_reliability(tables: Mapping[str, pd.DataFrame], location: str) -> str:
    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 4), dpi=120, squeeze=False)
    for ax, (name, t) in zip(axes[0], tables.items()):
        centers, width = (t["lower"] + t["upper"]) / 2, float(t["upper"].iloc[0] - t["lower"].iloc[0])
        filled = t["count"] > 0
        ax.bar(centers[filled], t["accuracy"][filled], width=width, edgecolor="k", lw=0.5, label="accuracy")
        # the gap from each bin's accuracy to its mean confidence, hatched (Guo et al. 2017's diagram)
        ax.bar(centers[filled], t["gap"][filled].abs(), width=width, bottom=np.minimum(
            t["accuracy"][filled], t["confidence"][filled]), color="none", edgecolor="C3", hatch="//", lw=0.5,
            label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel(name.replace("_", " "))
        ax.set_ylabel("accuracy" if name == "little_confidence" else "share where little suffices")
        ax.set_title(f"{name.replace('_', ' ')} · ECE {analysis.ece_of(t):.3f} · n={int(t['count'].sum())}",
                     fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    return _png(fig, location)


def plot_exit_histogram(rates: pd.DataFrame, tau: float, location: str) -> str:
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(rates) + 2), 3.8), dpi=120)
    ax.bar(rates["class"], rates["to_little"], label="little answered", color="C2")
    ax.bar(rates["class"], rates["to_big"], bottom=rates["to_little"], label="sent to big", color="C0")
    for cls, total, rate in zip(rates["class"], rates["samples"], rates["exit_rate"]):
        if total:
            ax.text(cls, total, f"{rate:.0%}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(rates["class"])
    ax.set_xlabel("class")
    ax.set_ylabel("inputs")
    ax.set_title(f"exits per class at tau={tau:g} (label: share answered by little)", fontsize=9)
    ax.legend(fontsize=8)
    return _png(fig, location)


def plot_tau_sensitivity(sweep: pd.DataFrame, tau: float, location: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(sweep["tau"], sweep["accuracy"], "o-", ms=3, color="C0", label="accuracy")
    ax.set_xlabel("tau (to little iff score >= tau)")
    ax.set_ylabel("accuracy", color="C0")
    ax.axvline(tau, color="grey", ls=":", lw=1)
    right = ax.twinx()
    right.plot(sweep["tau"], sweep["e_macs"] / 1e6, "s-", ms=3, color="C1", label="E[MACs]")
    right.set_ylabel("E[MACs] (M)", color="C1")
    ax.set_title(f"threshold sensitivity · largest accuracy step {analysis.largest_step(sweep):.3f}", fontsize=9)
    ax.grid(alpha=0.3)
    return _png(fig, location)


def plot_latency_macs(points: pd.DataFrame, location: str) -> str:
    devices = sorted(points["device"].unique())
    fig, axes = plt.subplots(1, len(devices), figsize=(4.5 * len(devices), 4), dpi=120, squeeze=False)
    markers = {"trunk": "s", "little": "o", "big": "D", "router": "^"}
    for ax, device in zip(axes[0], devices):
        on = points[points["device"] == device]
        for i, (precision, g) in enumerate(on.groupby("precision", sort=True)):
            for piece, gp in g.groupby("piece"):
                ax.scatter(gp["macs"] / 1e6, gp["latency_ms"], marker=markers.get(piece, "o"), color=f"C{i}",
                           s=22, label=f"{precision} {piece}")
        ax.set_xlabel("MACs (M)")
        ax.set_ylabel("measured latency (ms, median)")
        ax.set_title(f"{device} · {len(on)} pieces", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _png(fig, location)


def write_analysis(out: str | os.PathLike, pred: PairPredictions, costs: PairCosts, tau: float,
                   taus: Sequence[float] = DEFAULT_TAU_GRID, num_classes: int | None = None,
                   manifests: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Write the analysis of one pair's predictions into `out`; returns its figures for the JSON output
    (the same numbers as the Parquet tables)."""
    out = storage.normalize(out)
    files: list[str] = []

    def table(name: str, frame: pd.DataFrame) -> pd.DataFrame:
        files.append(storage.basename(storage.write_pandas(storage.join(out, f"{name}.parquet"), frame)))
        return frame

    def figure(name: str, draw, *args) -> str:
        files.append(storage.basename(draw(*args, storage.join(out, f"{name}.png"))))
        return files[-1]

    rel = reliability_tables(pred)
    table("reliability", pd.concat([t.assign(score=name) for name, t in rel.items()], ignore_index=True))
    figure("reliability", plot_reliability, rel)

    rates = table("exit_rates", analysis.exit_rates(pred.labels, pred.scores() >= tau, pred.little_correct,
                                                     pred.big_correct, num_classes))
    rates_md = markdown_table(rates.to_dict("records"), list(rates.columns))
    files.append(storage.basename(storage.write_text(storage.join(out, "exit_rates.md"), rates_md + "\n")))
    figure("exit_histogram", plot_exit_histogram, rates, tau)

    sweep = table("tau_sensitivity", analysis.tau_sweep(pred.scores(), pred.little_correct, pred.big_correct,
                                                        taus, costs.model("little"), costs.model("big")))
    figure("tau_sensitivity", plot_tau_sensitivity, sweep, tau)

    summary: dict[str, Any] = {
        "out": out, "ece": {name: analysis.ece_of(t) for name, t in rel.items()},
        "tau": float(tau), "exit_rate": float((pred.scores() >= tau).mean()),
        "exit_rates": {int(r["class"]): r["exit_rate"] for r in rates.to_dict("records")},
        "tau_sensitivity": sweep.to_dict("records"), "largest_accuracy_step": analysis.largest_step(sweep),
    }
    points = analysis.measured_points(manifests or {})
    if points.empty:
        summary["latency_macs"] = NO_MEASUREMENTS
    else:
        table("latency_macs", points)
        fit = table("latency_macs_fit", analysis.macs_latency_fit(points))
        figure("latency_macs", plot_latency_macs, points)
        summary["latency_macs"] = fit.to_dict("records")
    files.append(storage.basename(storage.write_text(storage.join(out, "analysis.md"),
                                                     _page(summary, rates_md, files))))
    summary["files"] = files
    return summary


def _page(summary: Mapping[str, Any], rates_md: str, files: Sequence[str]) -> str:
    ece = ", ".join(f"{name.replace('_', ' ')} {value:.4f}" for name, value in summary["ece"].items())
    lines = ["# Big/little analysis", "", f"ECE (15 bins): {ece}", "",
             f"Share answered by little at tau={summary['tau']:g}: {summary['exit_rate']:.4f}", ""]
    lines += [f"![{f[:-4]}]({f})" for f in files if f.endswith(".png")]
    lines += ["", "## Per-class exit rate", "", rates_md, ""]
    if isinstance(summary["latency_macs"], str):
        lines += [f"Note: {summary['latency_macs']}", ""]
    else:
        lines += ["## MACs vs measured latency", "",
                  markdown_table(summary["latency_macs"], ["device", "precision", "points", "pearson", "spearman"]),
                  ""]
    return "\n".join(lines)
