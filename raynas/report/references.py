"""The space's reference models (raynas.space.references) as points of a search's report: predicted like every
candidate, then exported and measured exactly as the exported front is, on the same device at the same precision,
so "the front beats MobileNetV3-Large at 8 ms" compares like with like.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from raynas import storage
from raynas.space import Arch, SearchSpace

# (records holding `arch`, the folder to write them under, precision) -> the records with their export and
# measurement fields: `raynas.search.runner.export_and_measure` bound to the run's device and evaluators.
ExportFn = Callable[[list[dict], str, str], list[dict]]
# arch -> {"params", "macs", "latency_ms"}: the search's own estimate (raynas.search.driver.estimate_fn).
EstimateFn = Callable[[Arch], dict[str, Any]]

FOLDER = "references"  # under run_dir: onnx/ and exports/ of the reference models, apart from the front's


def reference_points(space: SearchSpace, estimate: EstimateFn, run_dir: str, export: ExportFn,
                     precision: str = "fp32", accuracy_field: str = "accuracy_supernet") -> list[dict]:
    """One record per reference of `space`: name, full arch JSON, predicted cost and latency, and what
    `export` adds (ONNX path relative to run_dir, measured latency, accuracies). `accuracy` is the export's
    `accuracy_field`, the accuracy the front's points show (the supernet's, unless the search scores
    deployed accuracy)."""
    if not space.references:
        return []
    chosen = [{"reference": ref.name, "description": ref.description, "arch": ref.arch.to_json(),
               **estimate(ref.arch)} for ref in space.references.values()]
    print(f"[search] references: {', '.join(space.references)} at {precision}", file=sys.stderr, flush=True)
    done = export(chosen, storage.join(run_dir, FOLDER), precision)
    return [{**rec, "onnx": f"{FOLDER}/{rec['onnx']}", "accuracy": rec.get(accuracy_field),
             "precision": rec.get("precision", precision)} for rec in done]
