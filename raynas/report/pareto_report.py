"""The run report: a Pareto plot (PNG) and a Markdown summary of the search and its exports."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: cluster nodes have no display
import matplotlib.pyplot as plt  # noqa: E402

from raynas import storage  # noqa: E402


def plot_pareto(records: Sequence[dict], front: Sequence[dict], out: str | os.PathLike, x: str = "latency_ms",
                title: str = "") -> str:
    """The Pareto plot as a PNG at the location `out` (rendered in memory, written through storage)."""
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
    ax.set_xlabel({"latency_ms": "predicted latency (ms)", "params": "parameters", "macs": "MACs"}.get(x, x))
    ax.set_ylabel("accuracy (inherited weights, BN recalibrated)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    return storage.write_bytes(out, png.getbuffer())


def _live_section(measured: Sequence[dict], history: Sequence[dict]) -> list[str]:
    """Predicted (by the model as it was then) vs measured for every live-measured candidate, and how the
    model's calibration moved generation by generation."""
    rows = [{**m, "error_pct": 100 * (m["predicted_ms"] - m["measured_ms"]) / m["measured_ms"]} for m in measured]
    return ["## Live latency: predicted vs measured", "",
            markdown_table(rows, ["generation", "predicted_ms", "measured_ms", "error_pct", "measured_node", "arch"]),
            "", "## Calibration after each generation (-1: before the search)", "",
            markdown_table(history, ["generation", "live_measured", "slope", "intercept"]), ""]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(run_dir: str | os.PathLike, summary: dict, records: Sequence[dict], front: Sequence[dict],
                 exported: Sequence[dict], live: tuple[Sequence[dict], Sequence[dict]] | None = None) -> str:
    """`report.md` and `pareto.png` in `run_dir`; links are relative, so the report reads the same anywhere.
    `live`: (every live-measured candidate, the calibration after each generation) of a corrected search."""
    png = plot_pareto(records, front, storage.join(run_dir, "pareto.png"),
                      title=f"{summary['space']} · {summary['algorithm']} · {len(records)} evaluations")
    lines = [
        f"# raynas search report: {summary['space']}",
        "",
        markdown_table([summary], list(summary)),
        "",
        f"![Pareto front]({storage.basename(png)})",
        "",
        "## Pareto front",
        "",
        markdown_table(front, ["accuracy", "latency_ms", "latency_source", "params", "macs", "generation", "arch"]),
        "",
        *(_live_section(*live) if live else []),
        "## Exported subnets (ONNX)",
        "",
        markdown_table(exported, ["onnx", "accuracy", "latency_ms", "measured_ms", "measured_iqr_ms", "params",
                                  "macs"]) if exported else "none",
        "",
    ]
    return storage.write_text(storage.join(run_dir, "report.md"), "\n".join(lines))
