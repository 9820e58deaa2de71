"""The run report: a Pareto plot (PNG), a Markdown summary of the search and its exports, and the same points in
Parquet (`report.parquet`).

Tables show each arch as its space's one-line summary (`SearchSpace.arch_summary`); the full arch JSON is in
the Parquet files (this one's `arch` column, and evaluations / front / exported). The plot puts each exported
subnet's measured latency beside its prediction, and the space's reference models (raynas.report.references),
measured on the same device at the same precision, as labelled points.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: cluster nodes have no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from raynas import storage  # noqa: E402
from raynas.space import Arch, SearchSpace  # noqa: E402


def _known(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def plot_pareto(records: Sequence[dict], front: Sequence[dict], out: str | os.PathLike, x: str = "latency_ms",
                title: str = "", exported: Sequence[dict] = (), references: Sequence[dict] = ()) -> str:
    """The Pareto plot as a PNG at the location `out` (rendered in memory, written through storage).

    On the latency axis, each exported subnet's measured latency is a hollow marker joined to its predicted
    point; each reference model is a labelled star at its prediction, hollow at its measurement (a reference
    without an accuracy is a labelled vertical line at its latency)."""
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    feasible = [r for r in records if r.get("feasible", True)]
    infeasible = [r for r in records if not r.get("feasible", True)]
    ax.scatter([r[x] for r in feasible], [r["accuracy"] for r in feasible], s=10, alpha=0.45,
               label=f"evaluated ({len(feasible)})")
    if infeasible:
        ax.scatter([r[x] for r in infeasible], [r["accuracy"] for r in infeasible], s=10, alpha=0.45,
                   marker="x", color="grey", label=f"violates constraints ({len(infeasible)})")
    ax.step([r[x] for r in front], [r["accuracy"] for r in front], where="post", color="C3", lw=1.5)
    ax.scatter([r[x] for r in front], [r["accuracy"] for r in front], color="C3", s=24, zorder=3,
               label=f"Pareto front ({len(front)})")
    if x == "latency_ms":  # measurements are latencies: they belong on the latency axis only
        measured = [r for r in exported if _known(r.get("measured_ms"))]
        _predicted_and_measured(ax, measured, "C3", "o", f"exported, measured ({len(measured)})")
        _references(ax, references)
    ax.set_xlabel({"latency_ms": "latency (ms): predicted, hollow = measured", "params": "parameters",
                   "macs": "MACs"}.get(x, x))
    ax.set_ylabel("accuracy (inherited weights, BN recalibrated)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")  # references and measurements land anywhere: the emptiest corner
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    return storage.write_bytes(out, png.getbuffer())


def _predicted_and_measured(ax, rows: Sequence[dict], color: str, marker: str, label: str, size: int = 40) -> None:
    """Hollow markers at the measured latency, each joined by a thin line to its predicted point."""
    if not rows:
        return
    for r in rows:
        if _known(r.get("latency_ms")):
            ax.plot([r["latency_ms"], r["measured_ms"]], [r["accuracy"]] * 2, color=color, lw=0.8, alpha=0.6)
    ax.scatter([r["measured_ms"] for r in rows], [r["accuracy"] for r in rows], s=size, marker=marker,
               facecolors="none", edgecolors=color, zorder=4, label=label)


def _references(ax, references: Sequence[dict]) -> None:
    scored = [r for r in references if _known(r.get("accuracy"))]
    predicted = [r for r in scored if _known(r.get("latency_ms"))]
    if predicted:
        ax.scatter([r["latency_ms"] for r in predicted], [r["accuracy"] for r in predicted], s=90, marker="*",
                   color="C2", zorder=5, label=f"reference, predicted ({len(predicted)})")
    measured = [r for r in scored if _known(r.get("measured_ms"))]
    _predicted_and_measured(ax, measured, "C2", "*", f"reference, measured ({len(measured)})", size=110)
    for r in scored:
        at = r["measured_ms"] if _known(r.get("measured_ms")) else r.get("latency_ms")
        if _known(at):
            ax.annotate(r["reference"], (at, r["accuracy"]), xytext=(4, 4), textcoords="offset points", fontsize=7,
                        color="C2")
    for r in references:
        at = r.get("measured_ms") if _known(r.get("measured_ms")) else r.get("latency_ms")
        if r not in scored and _known(at):
            ax.axvline(at, color="C2", ls="--", lw=0.8)
            ax.annotate(r["reference"], (at, 0.02), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                        color="C2", xytext=(2, 0), textcoords="offset points")


def _live_section(measured: Sequence[dict], history: Sequence[dict]) -> list[str]:
    """Predicted (by the model as it was then) vs measured for every live-measured candidate, and how the
    model's calibration moved generation by generation."""
    rows = [{**m, "error_pct": 100 * (m["predicted_ms"] - m["measured_ms"]) / m["measured_ms"]} for m in measured]
    return ["## Live latency: predicted vs measured", "",
            markdown_table(rows, ["generation", "predicted_ms", "measured_ms", "error_pct", "measured_node", "arch"]),
            "", "## Calibration after each generation (-1: before the search)", "",
            markdown_table(history, ["generation", "live_measured", "slope", "intercept"]), ""]


def _fmt(value: Any) -> str:
    if value is None:  # not measured / not evaluated
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")  # a cell's own pipes (arch summaries) would split the row


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _summarised(space: SearchSpace, rows: Sequence[dict]) -> list[dict]:
    """Rows whose `arch` is the space's one-line summary (the full JSON stays in the Parquet files)."""
    return [{**r, "arch": space.arch_summary(Arch.from_json(r["arch"]))} for r in rows]


def report_rows(space: SearchSpace, front: Sequence[dict], exported: Sequence[dict],
                references: Sequence[dict]) -> pd.DataFrame:
    """`report.parquet`: the front (with each exported member's export and measurement) and the references,
    `role` front|reference, the full `arch` JSON beside its `arch_summary`."""
    exports = {r["arch"]: r for r in exported}
    rows = [{"role": "front", **r, **exports.get(r["arch"], {})} for r in front]
    rows += [{"role": "reference", **r} for r in references]
    return pd.DataFrame([{**r, "arch_summary": space.arch_summary(Arch.from_json(r["arch"]))} for r in rows])


def write_report(run_dir: str | os.PathLike, summary: dict, records: Sequence[dict], front: Sequence[dict],
                 exported: Sequence[dict], live: tuple[Sequence[dict], Sequence[dict]] | None = None, *,
                 space: SearchSpace, references: Sequence[dict] = ()) -> str:
    """`report.md`, `pareto.png` and `report.parquet` in `run_dir`; links are relative, so the report reads the
    same anywhere. `live`: (every live-measured candidate, the calibration after each generation) of a corrected
    search. `references`: the space's reference models, exported and measured (raynas.report.references)."""
    png = plot_pareto(records, front, storage.join(run_dir, "pareto.png"),
                      title=f"{summary['space']} · {summary['algorithm']} · {len(records)} evaluations",
                      exported=exported, references=references)
    storage.write_pandas(storage.join(run_dir, "report.parquet"), report_rows(space, front, exported, references))
    lines = [
        f"# raynas search report: {summary['space']}",
        "",
        markdown_table([summary], list(summary)),
        "",
        f"![Pareto front]({storage.basename(png)})",
        "",
        "## Pareto front",
        "",
        "Archs as one-line summaries; the full arch JSON is in `report.parquet` and `front.parquet`.",
        "",
        markdown_table(_summarised(space, front),
                       ["accuracy", "latency_ms", "latency_source",
                        *(["energy_mj"] if any(r.get("energy_mj") is not None for r in front) else []),
                        "params", "macs", "generation", "arch"]),
        "",
        *(_live_section(_summarised(space, live[0]), live[1]) if live else []),
        "## Exported subnets (ONNX)",
        "",
        "Accuracy as the search scored it, the supernet's (BN recalibrated) and the written model's in "
        "onnxruntime at the deploy precision.",
        "",
        markdown_table(_summarised(space, exported), ["onnx", "precision", "accuracy", "accuracy_supernet",
                                                      "accuracy_deployed", "latency_ms", "measured_ms",
                                                      "measured_iqr_ms", "size_mb", "params", "macs", "arch"])
        if exported else "none",
        "",
        *(_references_section(space, references) if references else []),
    ]
    return storage.write_text(storage.join(run_dir, "report.md"), "\n".join(lines))


def _references_section(space: SearchSpace, references: Sequence[dict]) -> list[str]:
    """The reference models, predicted and measured like the exported front (same device, same precision)."""
    return ["## Reference models", "",
            markdown_table(_summarised(space, references),
                           ["reference", "description", "accuracy", "latency_ms", "measured_ms", "measured_iqr_ms",
                            "precision", "params", "macs", "onnx", "arch"]), ""]
