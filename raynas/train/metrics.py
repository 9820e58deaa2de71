"""Per-epoch metrics of a run as one Parquet table (`<run_dir>/metrics.parquet`) that pandas reads.

Rows are appended epoch by epoch; a re-done epoch (after a failure) replaces its earlier row, so
the table has one row per completed epoch whatever happened to the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

METRICS_FILE = "metrics.parquet"


def append_metrics(run_dir: str | Path, row: dict[str, Any]) -> Path:
    path = Path(run_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    if path.is_file():
        rows = [r for r in pq.read_table(path).to_pylist() if r.get("epoch") != row["epoch"]]
    rows.append(row)
    rows.sort(key=lambda r: r["epoch"])
    # Columns may appear later (e.g. evaluation every k epochs): unify, missing values as nulls.
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows])
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)  # atomic: readers never see a half-written table
    return path


def read_metrics(run_dir: str | Path):
    """The run's metrics as a pandas DataFrame (one row per completed epoch)."""
    import pandas as pd

    return pd.read_parquet(Path(run_dir) / METRICS_FILE)
