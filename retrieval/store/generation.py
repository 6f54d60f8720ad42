"""Committing a generation: staged shards become an immutable gen-NNNNNN folder, then the manifest names it."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval.atomic import sync_dir, write_json
from retrieval.config import SearchConfig
from retrieval.errors import EmptyInputError, RetrieveError
from retrieval.store.files import METADATA_SCHEMA, conform, read_jsonl, write_jsonl, write_npy, write_parquet
from retrieval.store.manifest import GENERATION, MANIFEST, Counts, Manifest
from retrieval.store.reader import ShardedVectors
from retrieval.store.staging import Staging
from retrieval.store.sync import built_with

if TYPE_CHECKING:
    from retrieval.progress import Progress
    from retrieval.store.sync import Base


def _generations(index_dir: Path) -> list[Path]:
    # Exactly our own names: a user's `gen-2023/` folder is neither counted nor ever deleted.
    return sorted(p for p in index_dir.glob("gen-*") if p.is_dir() and GENERATION.fullmatch(p.name))


@dataclass(frozen=True)
class _Selection:
    """The rows a generation keeps, in scan (path) order, and where each one's vector is staged."""

    rows: pa.Table  # METADATA_SCHEMA: an Arrow table, not a million Python dicts held all build long
    skipped: list[dict[str, Any]]
    shard: np.ndarray  # staged shard of each row
    row: np.ndarray  # its row in that shard


def _sources(shard_paths: list[Path], base: Base | None) -> list[tuple[Path, Path]]:
    """(metadata, ledger) files of each source of rows, oldest first: the generation a sync
    starts from, then the staged shards in write order."""
    sources = [(base.folder / "metadata.parquet", base.folder / "skipped.jsonl")] if base else []
    return sources + [(s.with_suffix(".parquet"), s.with_suffix(".skipped.jsonl")) for s in shard_paths]


def _select(sources: list[tuple[Path, Path]], order: Sequence[str]) -> _Selection:
    """The latest entry of each path still in `order` (the scan), in scan order."""
    import pyarrow.compute as pc

    # A file changed between runs is staged twice: the later shard wins, in vectors and in the
    # ledger. Each entry's sequence number is its source << 32 plus its place there (ledger last).
    tables = [METADATA_SCHEMA.empty_table().append_column("_seq", pa.array([], pa.int64()))]
    ledger: list[dict[str, Any]] = []
    ledger_seq: list[int] = []
    for si, (meta, skipped) in enumerate(sources):
        t = conform(pq.read_table(meta))
        tables.append(t.append_column("_seq", pa.array((si << 32) + np.arange(len(t), dtype=np.int64))))
        for j, row in enumerate(read_jsonl(skipped)):
            ledger.append(row)
            ledger_seq.append((si << 32) + (1 << 31) + j)
    rows = pa.concat_tables(tables)
    ledger_paths, ledger_seqs = (
        pa.array([r["path"] for r in ledger], pa.string()),
        pa.array(ledger_seq, pa.int64()),
    )
    entries = pa.table(
        {
            "path": pa.concat_arrays([rows["path"].combine_chunks(), ledger_paths]),
            "seq": pa.concat_arrays([rows["_seq"].combine_chunks(), ledger_seqs]),
        }
    )
    latest = entries.group_by("path").aggregate([("seq", "max")])["seq_max"]
    scan = pa.array(order, pa.string())
    rows = rows.filter(pc.is_in(rows["_seq"], value_set=latest))
    rank = pc.index_in(rows["path"], value_set=scan)  # null: deleted since it was staged
    rows = rows.append_column("_rank", rank).filter(pc.is_valid(rank)).sort_by("_rank")
    kept = pc.is_in(ledger_seqs, value_set=latest).to_pylist()
    ranks = pc.index_in(ledger_paths, value_set=scan).to_pylist()
    ranked = [(i, r) for r, k, i in zip(ledger, kept, ranks, strict=True) if k and i is not None]
    skipped = [r for _, r in sorted(ranked, key=lambda e: e[0])]
    seq = rows["_seq"].to_numpy()
    return _Selection(rows.select(METADATA_SCHEMA.names), skipped, seq >> 32, seq & 0xFFFFFFFF)


def _history(index_dir: Path) -> tuple[dict[str, Any], ...]:
    """The history of the index's live manifest, if it has a readable one."""
    from retrieval.store.reader import read_manifest

    try:
        return read_manifest(index_dir).history
    except (RetrieveError, OSError):
        return ()


def _stable_ids(rows: pa.Table, base: Base | None) -> tuple[np.ndarray, int]:
    """Each kept row's id, and the next unused one. A path the base generation held keeps its id;
    a moved file (the content hash of a base row whose path is gone) takes that row's; any other
    row gets the next id never used. Without a base (a first run, a rebuild) ids are the rows."""
    import pyarrow.compute as pc

    if base is None:
        return np.arange(len(rows), dtype=np.int64), len(rows)
    table = pq.read_table(base.folder / "metadata.parquet")
    meta, base_ids = conform(table), table["id"].to_numpy()
    at = pc.fill_null(pc.index_in(rows["path"], value_set=meta["path"]), -1).to_numpy()
    ids = np.where(at >= 0, base_ids[np.maximum(at, 0)], -1)
    # Rows whose path is gone, by content: each one's id can go to one moved file.
    gone = ~pc.is_in(meta["path"], value_set=rows["path"]).to_numpy(zero_copy_only=False)
    by_hash: dict[str, list[int]] = {}
    hashes = meta["hash"].to_pylist()
    for j in np.flatnonzero(gone):
        if hashes[j]:
            by_hash.setdefault(hashes[j], []).append(int(base_ids[j]))
    new_hashes = rows["hash"].to_pylist()
    for r in np.flatnonzero(ids < 0):
        if (h := new_hashes[r]) and by_hash.get(h):
            ids[r] = by_hash[h].pop(0)
    start = max(
        base.manifest.counts.next_id or base.manifest.counts.indexed, int(base_ids.max(initial=-1)) + 1
    )
    fresh = np.flatnonzero(ids < 0)
    ids[fresh] = start + np.arange(len(fresh))
    return ids, start + len(fresh)


def _write_vectors(
    selection: _Selection, arrays: list[Any], dim: int, shard_rows: int, out_dir: Path
) -> list[str]:
    """Write the kept vectors in row order to `out_dir` as shards of `shard_rows`; their file names.

    `arrays` holds each source's rows (memory-mapped): gathered block by block, memory stays one block."""
    names: list[str] = []
    for start in range(0, len(selection.rows), shard_rows):
        src_shard = selection.shard[start : start + shard_rows]
        src_row = selection.row[start : start + shard_rows]
        out = np.empty((len(src_shard), dim), np.float32)
        for si in np.unique(src_shard):
            mask = src_shard == si
            src = arrays[si]
            out[mask] = src.take(src_row[mask]) if isinstance(src, ShardedVectors) else src[src_row[mask]]
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
    base: Base | None = None,
    changes: dict[str, int] | None = None,
) -> Manifest:
    """Turn the staged shards into a new generation, then switch manifest.json to it.

    `order` is the scan order of relative paths: ids follow it, whatever order (or how many
    interrupted runs) the shards were written in. Files staged but no longer present are dropped.
    `search` says which search index to build over the vectors (exact search by default); it is
    built from the generation's shards once they are written, memory-mapped, so the build holds
    the index and one training sample, not the vectors. `base` (a sync) is the live generation:
    its rows count as staged before every shard, so unchanged files keep their vectors.
    """
    from retrieval.index import build_search_index, update_search_index

    staging.flush()
    shard_paths = staging.shards()
    selection = _select(_sources(shard_paths, base), order)
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

    arrays: list[Any] = [ShardedVectors(base.vector_files, manifest.dim)] if base else []
    arrays += [np.load(s.with_suffix(".npy"), mmap_mode="r") for s in shard_paths]
    vector_files = _write_vectors(selection, arrays, manifest.dim, shard_rows, tmp)
    rows = ShardedVectors([tmp / f for f in vector_files], manifest.dim)
    search = search or SearchConfig(search="exact")
    ids, next_id = _stable_ids(selection.rows, base)
    index = None
    prior = base.manifest.search_index if base is not None else {}
    if prior.get("type") == "faiss" and built_with(prior, search):
        # Unchanged rows came from the base generation under their ids: the index keeps them.
        carried = selection.shard == 0
        index = update_search_index(
            base.folder / "index.faiss",
            base.manifest.search_index,
            rows,
            ids,
            carried,
            manifest.metric,
            search,
            progress,
        )
    if index is None:
        index = build_search_index(rows, manifest.metric, search, progress, ids)
    index.save(tmp / "index.faiss")
    with open(tmp / "index.faiss", "rb+") as fh:  # FAISS writes it directly: make it durable too
        os.fsync(fh.fileno())
    bytes_per_vector = round(os.path.getsize(tmp / "index.faiss") / len(rows), 1)
    write_parquet(tmp / "metadata.parquet", selection.rows.add_column(0, "id", pa.array(ids)))
    write_jsonl(tmp / "skipped.jsonl", selection.skipped)
    os.replace(tmp, index_dir / name)
    sync_dir(index_dir)  # the generation's name is on disk before the manifest names it

    # The history goes on across syncs and rebuilds (whatever settings made the previous one).
    manifest = dataclasses.replace(manifest, history=_history(index_dir))
    manifest = manifest.committed_as(
        name,
        vector_files,
        Counts(len(selection.rows), len(selection.skipped), next_id),
        # What index.faiss is, for `index.load_index`: its kind, factory string and parameters,
        # with what it measured (recall@10, latency) and its size.
        index.record() | {"bytes_per_vector": bytes_per_vector, "settings": asdict(search)},
        time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        changes,
    )
    write_json(index_dir / MANIFEST, manifest.to_dict())  # the atomic switch to the new generation
    for old in previous:
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging.dir, ignore_errors=True)
    return manifest
