"""Atomic writes of the index's data files (npy, parquet, jsonl) and the metadata schema."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval.atomic import atomic_write

METADATA_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("bytes", pa.int64()),
        ("mtime", pa.float64()),
        ("ctime", pa.float64()),
        # Where the file system gives them (null before they were recorded): a file replaced by
        # `mv` has another inode, and mtime in float seconds loses the nanoseconds.
        ("inode", pa.int64()),
        ("mtime_ns", pa.int64()),
        # blake2b-128 of the file's bytes, hex: a sync knows a moved file by it ("" for vectors
        # given with --vectors, null in generations made before it existed).
        ("hash", pa.string()),
    ]
)


def conform(table: pa.Table) -> pa.Table:
    """`table` (a generation or staged shard's metadata, of any version) in METADATA_SCHEMA: columns
    it lacks (written before they existed) are nulls, extra ones (the id) are left out."""
    for f in METADATA_SCHEMA:
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(len(table), f.type))
    return table.select(METADATA_SCHEMA.names).cast(METADATA_SCHEMA)


def write_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda fh: np.save(fh, array, allow_pickle=False))


def write_parquet(path: Path, table: pa.Table) -> None:
    atomic_write(path, lambda fh: pq.write_table(table, fh))


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    atomic_write(path, lambda fh: fh.write("".join(json.dumps(r) + "\n" for r in rows).encode()))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
