"""Append-only Parquet store of evaluations: one small part file per finished evaluation.

A part file is written as soon as its evaluation finishes, so a killed search loses at most
the evaluations in flight; `--resume` reads every part back and skips those archs.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


class ResultStore:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._records: dict[str, dict[str, Any]] = {}
        for record in self._read_parts():
            self._records.setdefault(record["arch"], record)

    def _read_parts(self) -> list[dict[str, Any]]:
        parts = sorted(self.directory.glob("part-*.parquet"))
        if not parts:
            return []
        table = pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default")
        return table.to_pylist()

    def __contains__(self, arch_json: str) -> bool:
        return arch_json in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, arch_json: str) -> dict[str, Any] | None:
        return self._records.get(arch_json)

    def append(self, record: dict[str, Any]) -> None:
        """Persist one evaluation (its `arch` field is the arch JSON) before acknowledging it."""
        if record["arch"] in self._records:
            raise ValueError(f"arch already evaluated: {record['arch']}")
        record = {**record, "stored_at": time.time()}
        # Time-ordered names keep `sorted()` in append order; the uuid keeps names unique.
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.directory / f".{name}.tmp"
        pq.write_table(pa.Table.from_pylist([record]), tmp)
        os.replace(tmp, self.directory / name)  # atomic: readers never see half a file
        self._records[record["arch"]] = record

    def records(self) -> list[dict[str, Any]]:
        return list(self._records.values())

    def to_pandas(self) -> pd.DataFrame:
        return pd.DataFrame(self.records())

    def compact(self, path: str | Path) -> Path:
        """All evaluations in one Parquet file (the run's `evaluations.parquet`)."""
        path = Path(path)
        pq.write_table(pa.Table.from_pylist(self.records()), path)
        return path
