"""Per-epoch metrics of a run as one Parquet table (`<run_dir>/metrics.parquet`) that pandas reads.

The run directory is a local path or a URI (s3://...): the table is read and written through
raynas.storage, atomically, so a reader on any node sees a whole table. Rows are appended epoch by
epoch; a re-done epoch (after a failure) replaces its earlier row, so the table has one row per
completed epoch whatever happened to the run.
"""

from __future__ import annotations

import os
from typing import Any

from raynas import storage

METRICS_FILE = "metrics.parquet"


def metrics_location(run_dir: str | os.PathLike) -> str:
    return storage.join(run_dir, METRICS_FILE)


def append_metrics(run_dir: str | os.PathLike, row: dict[str, Any]) -> str:
    location = metrics_location(run_dir)
    rows = []
    if storage.is_file(location):
        rows = [r for r in storage.read_table(location, "metrics").to_pylist() if r.get("epoch") != row["epoch"]]
    rows.append(row)
    rows.sort(key=lambda r: r["epoch"])
    # Columns may appear later (e.g. evaluation every k epochs): unified, missing values as nulls.
    return storage.write_rows(location, rows)


def read_metrics(run_dir: str | os.PathLike):
    """The run's metrics as a pandas DataFrame (one row per completed epoch)."""
    return storage.read_pandas(metrics_location(run_dir), "metrics")
