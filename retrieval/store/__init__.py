"""The on-disk index directory: the manifest, staging shards, generations, the writer lock and reading.

Layout of an index directory:

    manifest.json           the commit point: names the live generation; replaced atomically
    gen-000001/             one complete, immutable generation
        vectors-00000.npy   float32 vector shards, rows in path order
        metadata.parquet    id (stable across syncs), path (relative to root), label, width, height,
                            bytes, mtime, ctime, inode, mtime_ns, hash
        skipped.jsonl       the ledger of files that were not indexed, with reasons
        index.faiss         the FAISS index over all vectors
    .staging/               shards of a run in progress; a re-run with the same settings resumes

A killed run never touches the live generation, so the previous index stays readable; the next
run with the same settings reuses every staged shard and finishes the work.
"""

from retrieval.store.files import METADATA_SCHEMA, read_jsonl, write_jsonl, write_npy, write_parquet
from retrieval.store.generation import commit
from retrieval.store.lock import LOCK, writer_lock
from retrieval.store.manifest import (
    FORMAT,
    FORMAT_VERSION,
    GENERATION,
    MANIFEST,
    Counts,
    Manifest,
    WeightsRecord,
)
from retrieval.store.reader import ShardedVectors, generation_dir, load_vectors, read_manifest, shard_rows
from retrieval.store.staging import STAGING, Done, Staging

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "GENERATION",
    "LOCK",
    "MANIFEST",
    "METADATA_SCHEMA",
    "STAGING",
    "Counts",
    "Done",
    "Manifest",
    "ShardedVectors",
    "Staging",
    "WeightsRecord",
    "commit",
    "generation_dir",
    "load_vectors",
    "read_jsonl",
    "read_manifest",
    "shard_rows",
    "write_jsonl",
    "write_npy",
    "write_parquet",
    "writer_lock",
]
