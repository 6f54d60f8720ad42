"""Committing a generation: staged shards become an immutable gen-NNNNNN folder, then the manifest names it."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval.atomic import sync_dir, write_json
from retrieval.config import SearchConfig
from retrieval.errors import EmptyInputError
from retrieval.store.files import METADATA_SCHEMA, read_jsonl, write_jsonl, write_npy, write_parquet
from retrieval.store.manifest import GENERATION, MANIFEST, Counts, Manifest
from retrieval.store.reader import ShardedVectors
from retrieval.store.staging import Staging

if TYPE_CHECKING:
    from retrieval.progress import Progress


def _generations(index_dir: Path) -> list[Path]:
    # Exactly our own names: a user's `gen-2023/` folder is neither counted nor ever deleted.
    return sorted(p for p in index_dir.glob("gen-*") if p.is_dir() and GENERATION.fullmatch(p.name))


@dataclass(frozen=True)
class _Selection:
    """The rows a generation keeps, in id order, and where each one's vector is staged."""

    rows: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    shard: np.ndarray  # staged shard of each row
    row: np.ndarray  # its row in that shard


def _select(shard_paths: list[Path], order: Sequence[str]) -> _Selection:
    """The latest staged entry of each path still in `order` (the scan), in scan order."""
    rank = {p: i for i, p in enumerate(order)}
    # A file changed between runs is staged twice: the later shard wins, in vectors and in the ledger.
    latest: dict[str, tuple[int, int, dict[str, Any]]] = {}
    for si, shard in enumerate(shard_paths):
        for ri, row in enumerate(pq.read_table(shard.with_suffix(".parquet")).to_pylist()):
            latest[row["path"]] = (si, ri, row)
        for row in read_jsonl(shard.with_suffix(".skipped.jsonl")):
            latest[row["path"]] = (si, -1, row)
    src_shard, src_row, rows, skipped = [], [], [], []
    for path, (si, ri, row) in latest.items():
        if path not in rank:
            continue  # deleted since it was staged
        if ri < 0:
            skipped.append(row)
        else:
            src_shard.append(si)
            src_row.append(ri)
            rows.append(row)
    skipped.sort(key=lambda r: rank[r["path"]])
    perm = np.argsort([rank[r["path"]] for r in rows], kind="stable")
    return _Selection(
        [rows[i] for i in perm],
        skipped,
        np.asarray(src_shard, np.int64)[perm],
        np.asarray(src_row, np.int64)[perm],
    )


def _write_vectors(
    selection: _Selection, shard_paths: list[Path], dim: int, shard_rows: int, out_dir: Path
) -> list[str]:
    """Write the kept vectors in id order to `out_dir` as shards of `shard_rows`; their file names."""
    # Gather rows shard by shard from memory-mapped staging files: memory stays one block.
    arrays = [np.load(s.with_suffix(".npy"), mmap_mode="r") for s in shard_paths]
    names: list[str] = []
    for start in range(0, len(selection.rows), shard_rows):
        src_shard = selection.shard[start : start + shard_rows]
        src_row = selection.row[start : start + shard_rows]
        out = np.empty((len(src_shard), dim), np.float32)
        for si in np.unique(src_shard):
            mask = src_shard == si
            out[mask] = arrays[si][src_row[mask]]
        names.append(f"vectors-{len(names):05d}.npy")
        write_npy(out_dir / names[-1], out)
    return names


def commit(
    index_dir: Path,
    staging: Staging,
    order: Sequence[str],
    manifest: Manifest,
    shard_rows: int,
    search: SearchConfig | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Turn the staged shards into a new generation, then switch manifest.json to it.

    `order` is the scan order of relative paths: ids follow it, whatever order (or how many
    interrupted runs) the shards were written in. Files staged but no longer present are dropped.
    `search` says which search index to build over the vectors (exact search by default); it is
    built from the generation's shards once they are written, memory-mapped, so the build holds
    the index and one training sample, not the vectors.
    """
    from retrieval.index import build_search_index

    staging.flush()
    shard_paths = staging.shards()
    selection = _select(shard_paths, order)
    if not selection.rows:
        # Never replace a good index with an empty one.
        reasons = sorted({r["reason"].split(":")[0] for r in selection.skipped})
        raise EmptyInputError(
            f"None of the {len(selection.skipped)} image files could be read "
            f"({'; '.join(reasons) or 'no images'}); nothing was indexed and any previous index is untouched."
        )
    previous = _generations(index_dir)
    number = 1 + max((int(p.name.split("-")[1]) for p in previous), default=0)
    name = f"gen-{number:06d}"
    tmp = index_dir / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    vector_files = _write_vectors(selection, shard_paths, manifest.dim, shard_rows, tmp)
    rows = ShardedVectors([tmp / f for f in vector_files], manifest.dim)
    index = build_search_index(rows, manifest.metric, search or SearchConfig(search="exact"), progress)
    index.save(tmp / "index.faiss")
    with open(tmp / "index.faiss", "rb+") as fh:  # FAISS writes it directly: make it durable too
        os.fsync(fh.fileno())
    bytes_per_vector = round(os.path.getsize(tmp / "index.faiss") / len(rows), 1)
    ids = pa.array(np.arange(len(selection.rows), dtype=np.int64))
    table = pa.Table.from_pylist(selection.rows, schema=METADATA_SCHEMA)
    write_parquet(tmp / "metadata.parquet", table.add_column(0, "id", ids))
    write_jsonl(tmp / "skipped.jsonl", selection.skipped)
    os.replace(tmp, index_dir / name)
    sync_dir(index_dir)  # the generation's name is on disk before the manifest names it

    manifest = manifest.committed_as(
        name,
        vector_files,
        Counts(len(selection.rows), len(selection.skipped)),
        # What index.faiss is, for `index.load_index`: its kind, factory string and parameters,
        # with what it measured (recall@10, latency) and its size.
        index.record() | {"bytes_per_vector": bytes_per_vector},
        time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    write_json(index_dir / MANIFEST, manifest.to_dict())  # the atomic switch to the new generation
    for old in previous:
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging.dir, ignore_errors=True)
    return manifest
