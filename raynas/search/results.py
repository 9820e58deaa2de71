"""Append-only Parquet store of evaluations: one small part file per finished evaluation.

A part file is written (atomically, through raynas.storage) as soon as its evaluation finishes, so a
killed search loses at most the evaluations in flight; `--resume` reads every part back from storage,
from any node and working directory, and skips those archs.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pandas as pd
import pyarrow as pa

from raynas import storage

PART_PREFIX, PART_SUFFIX = "part-", ".parquet"
# Parts are small objects: on an object store, reading them one by one would be latency-bound.
READ_THREADS = 16


def part_files(directory: str | os.PathLike) -> list[str]:
    """Locations of the parts stored in `directory`, in append order (none when it does not exist)."""
    return [p for p in storage.list_files(directory, PART_SUFFIX) if storage.basename(p).startswith(PART_PREFIX)]


class ResultStore:
    def __init__(self, directory: str | os.PathLike):
        self.directory = storage.normalize(directory)
        self._records: dict[str, dict[str, Any]] = {}
        for record in self._read_parts():
            self._records.setdefault(record["arch"], record)

    def part_files(self) -> list[str]:
        return part_files(self.directory)

    def _read_parts(self) -> list[dict[str, Any]]:
        parts = self.part_files()
        if not parts:
            return []
        with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(parts))) as pool:
            tables = [t for t in pool.map(self._read_part, parts) if t is not None]
        return pa.concat_tables(tables, promote_options="default").to_pylist() if tables else []

    @staticmethod
    def _read_part(location: str) -> pa.Table | None:
        """One part; a corrupt one (torn by a writer of an older raynas, whose writes were not atomic) is
        set aside and its evaluation done again, rather than failing every resume of the search."""
        try:
            return storage.read_table(location, "evaluation part")
        except storage.CorruptFile as exc:
            moved = storage.set_aside(location)
            print(f"[search] {exc}; set aside as {storage.display(moved)}, its evaluation is redone",
                  file=sys.stderr, flush=True)
            return None

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
        # Time-ordered names keep name order in append order; the uuid keeps names unique across writers.
        name = f"{PART_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}{PART_SUFFIX}"
        storage.write_table(storage.join(self.directory, name), pa.Table.from_pylist([record]))
        self._records[record["arch"]] = record

    def records(self) -> list[dict[str, Any]]:
        return list(self._records.values())

    def to_pandas(self) -> pd.DataFrame:
        return pd.DataFrame(self.records())

    def compact(self, location: str | os.PathLike, records: list[dict[str, Any]] | None = None) -> str:
        """All evaluations in one Parquet file (the run's `evaluations.parquet`); `records`: these instead
        of the stored ones (e.g. with live-measured latencies in place of predicted ones)."""
        # Records may differ in fields (e.g. the live measurement only measured candidates carry).
        return storage.write_rows(location, self.records() if records is None else records)
