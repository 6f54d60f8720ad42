"""The on-disk index directory: atomic writes, resumable staging shards, and generations.

Layout of an index directory:

    manifest.json           the commit point: names the live generation; replaced atomically
    gen-000001/             one complete, immutable generation
        vectors-00000.npy   float32 vector shards, rows in id order
        metadata.parquet    id, path (relative to root), label, width, height, bytes, mtime, ctime
        skipped.jsonl       the ledger of files that were not indexed, with reasons
        index.faiss         the FAISS index over all vectors
    .staging/               shards of a run in progress; a re-run with the same settings resumes

A killed run never touches the live generation, so the previous index stays readable; the next
run with the same settings reuses every staged shard and finishes the work.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval.atomic import atomic_write, sync_dir, write_json
from retrieval.errors import EmptyInputError, IndexFormatError, IndexNotFoundError, RetrieveError

if TYPE_CHECKING:
    from retrieval.index import VectorIndex

FORMAT = "retrieve-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STAGING = ".staging"
LOCK = ".lock"
GENERATION = re.compile(r"gen-\d{6,}")

METADATA_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("bytes", pa.int64()),
        ("mtime", pa.float64()),
        ("ctime", pa.float64()),
    ]
)


# ----------------------------------------------------------------------------------------------
# Atomic file writes


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


# ----------------------------------------------------------------------------------------------
# One writer at a time


@contextlib.contextmanager
def writer_lock(index_dir: Path, warn: Callable[[str], None] = lambda message: None) -> Iterator[None]:
    """Hold the index folder's write lock, or fail at once if another run holds it.

    Two runs on one folder share `.staging/` and delete it under each other at commit, so the
    second one must not start. The lock is an advisory `flock` on `.lock`: the kernel drops it when
    its holder dies, so a killed run never leaves the folder locked. Where the file system refuses
    locks (some NFS mounts), the run goes on unlocked and `warn` says so.
    """
    if index_dir.exists() and not index_dir.is_dir():
        raise IndexFormatError(f"{index_dir} is a file, not an index folder; choose another --index.")
    created = not index_dir.exists()
    index_dir.mkdir(parents=True, exist_ok=True)
    with _flock(index_dir / LOCK, warn):
        try:
            yield
        finally:
            # A run that failed before writing anything (a bad --backbone, say) leaves no empty
            # folder; removed while the lock is held, so no other run can be inside it.
            if created and {p.name for p in index_dir.iterdir()} <= {LOCK}:
                shutil.rmtree(index_dir, ignore_errors=True)


@contextlib.contextmanager
def _flock(path: Path, warn: Callable[[str], None]) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks, the caller is trusted to run one job
        yield
        return
    index_dir = path.parent
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise RetrieveError(
                f"Another `retrieve index` (pid {holder}) is writing to {index_dir}; wait for it to "
                "finish, or write to another --index."
            ) from None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: a file system without locks, not another run
            unlockable = exc.strerror or str(exc)
        else:
            unlockable = None
        if unlockable is not None:
            warn(
                f"{index_dir} cannot be locked ({unlockable}; a network file system?): going on "
                "without the lock, so do not start a second `retrieve index` on it meanwhile."
            )
            yield
            return
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------
# Staging: the resumable part of a run


@dataclass(frozen=True)
class Done:
    """A file the staging area has already handled (embedded or skipped), keyed by relpath."""

    size: int
    mtime: float
    ctime: float


class Staging:
    """Shards of the run in progress. A shard is valid once its metadata file exists (written last)."""

    def __init__(self, index_dir: Path, key: dict[str, Any], shard_rows: int) -> None:
        self.dir = index_dir / STAGING
        self.key = key
        self.shard_rows = shard_rows
        # One entry per add(): a single append, so an exception raised between two bytecodes (Ctrl-C,
        # DataLoader's SIGCHLD handler) can never leave vectors without their rows.
        self._pending: list[tuple[np.ndarray | None, list[dict[str, Any]], list[dict[str, Any]]]] = []
        self._next = 0

    def open(self) -> dict[str, Done]:
        """Reuse staged shards made with the same settings; otherwise start clean. Returns what is done."""
        key_file = self.dir / "run.json"
        if key_file.exists():
            try:
                same = json.loads(key_file.read_text()) == self.key
            except (OSError, json.JSONDecodeError):
                same = False
            if not same:
                shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(key_file, self.key)
        done: dict[str, Done] = {}
        for shard in self.shards():
            cols = ("path", "bytes", "mtime", "ctime")
            table = pq.read_table(shard.with_suffix(".parquet"), columns=list(cols))
            for p, b, m, c in zip(*(table.column(c).to_pylist() for c in cols), strict=True):
                done[p] = Done(b, m, c)
            for row in read_jsonl(shard.with_suffix(".skipped.jsonl")):
                if row.get("crash"):
                    # It crashed the decoder: decoded again, in case the machine was at fault.
                    done.pop(row["path"], None)
                    continue
                done[row["path"]] = Done(row["bytes"], row["mtime"], row.get("ctime", 0.0))
        self._next = 1 + max((int(s.stem.split("-")[1]) for s in self.shards()), default=-1)
        return done

    def shards(self) -> list[Path]:
        """Valid shards (stem paths without suffix), in write order."""
        if not self.dir.exists():
            return []
        return sorted(p.with_suffix("") for p in self.dir.glob("shard-*.parquet"))

    def add(self, vectors: np.ndarray, rows: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> None:
        block = np.asarray(vectors, dtype=np.float32) if len(vectors) else None
        self._pending.append((block, list(rows) if block is not None else [], list(skipped)))
        if sum(len(r) for _, r, _ in self._pending) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        pending = self._pending
        if not any(r or s for _, r, s in pending):
            return
        stem = self.dir / f"shard-{self._next:06d}"
        blocks = [v for v, _, _ in pending if v is not None]
        dim = blocks[0].shape[1] if blocks else 0
        vectors = np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float32)
        rows = [row for _, r, _ in pending for row in r]
        write_npy(stem.with_suffix(".npy"), vectors)
        write_jsonl(stem.with_suffix(".skipped.jsonl"), [row for _, _, s in pending for row in s])
        # The metadata file is written last: its presence is what makes the shard count.
        write_parquet(stem.with_suffix(".parquet"), pa.Table.from_pylist(rows, schema=METADATA_SCHEMA))
        # The count moves on before the buffer is cleared: interrupted between the two, the next
        # flush writes the same rows again under a new name (harmless: commit keeps the later copy)
        # rather than over this shard with fewer rows.
        self._next += 1
        self._pending = []


# ----------------------------------------------------------------------------------------------
# Committing a generation


def _generations(index_dir: Path) -> list[Path]:
    # Exactly our own names: a user's `gen-2023/` folder is neither counted nor ever deleted.
    return sorted(p for p in index_dir.glob("gen-*") if p.is_dir() and GENERATION.fullmatch(p.name))


def commit(
    index_dir: Path,
    staging: Staging,
    order: Sequence[str],
    manifest: dict[str, Any],
    metric: str,
    shard_rows: int,
    index: VectorIndex | None = None,
) -> dict[str, Any]:
    """Turn the staged shards into a new generation, then switch manifest.json to it.

    `order` is the scan order of relative paths: ids follow it, whatever order (or how many
    interrupted runs) the shards were written in. Files staged but no longer present are dropped.
    `index` is the (unfitted) search index to build over the vectors: exact search by default.
    """
    from retrieval.index import ExactIndex

    staging.flush()
    rank = {p: i for i, p in enumerate(order)}
    shard_paths = staging.shards()
    arrays = [np.load(s.with_suffix(".npy"), mmap_mode="r") for s in shard_paths]
    tables = [pq.read_table(s.with_suffix(".parquet")) for s in shard_paths]
    # A file changed between runs is staged twice: the later shard wins, in vectors and in the ledger.
    latest: dict[str, tuple[int, int, dict[str, Any]]] = {}
    for si, (shard, table) in enumerate(zip(shard_paths, tables, strict=True)):
        for ri, row in enumerate(table.to_pylist()):
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
    src_shard_a, src_row_a = np.asarray(src_shard, np.int64)[perm], np.asarray(src_row, np.int64)[perm]
    rows = [rows[i] for i in perm]

    if not rows:
        # Never replace a good index with an empty one.
        reasons = sorted({r["reason"].split(":")[0] for r in skipped})
        raise EmptyInputError(
            f"None of the {len(skipped)} image files could be read ({'; '.join(reasons) or 'no images'}); "
            "nothing was indexed and any previous index is untouched."
        )
    previous = _generations(index_dir)
    number = 1 + max((int(p.name.split("-")[1]) for p in previous), default=0)
    name = f"gen-{number:06d}"
    tmp = index_dir / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    dim = int(manifest["dim"])
    vector_files: list[str] = []

    def blocks() -> Iterator[np.ndarray]:
        # Gather rows shard by shard from memory-mapped staging files: memory stays one block.
        for start in range(0, len(rows), shard_rows):
            sl = slice(start, start + shard_rows)
            out = np.empty((len(src_shard_a[sl]), dim), np.float32)
            for si in np.unique(src_shard_a[sl]):
                mask = src_shard_a[sl] == si
                out[mask] = arrays[si][src_row_a[sl][mask]]
            fname = f"vectors-{len(vector_files):05d}.npy"
            write_npy(tmp / fname, out)
            vector_files.append(fname)
            yield out

    index = (index or ExactIndex(metric=metric)).fit(blocks())
    index.save(tmp / "index.faiss")
    with open(tmp / "index.faiss", "rb+") as fh:  # FAISS writes it directly: make it durable too
        os.fsync(fh.fileno())
    ids = pa.array(np.arange(len(rows), dtype=np.int64))
    table = pa.Table.from_pylist(rows, schema=METADATA_SCHEMA)
    write_parquet(tmp / "metadata.parquet", table.add_column(0, "id", ids))
    write_jsonl(tmp / "skipped.jsonl", skipped)
    os.replace(tmp, index_dir / name)
    sync_dir(index_dir)  # the generation's name is on disk before the manifest names it

    manifest = {
        **manifest,
        "generation": name,
        "vector_files": vector_files,
        "counts": {"indexed": len(rows), "skipped": len(skipped)},
        # What index.faiss is, for `index.load_index`: its kind, factory string and parameters.
        "search_index": index.record(),
        "committed": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(index_dir / MANIFEST, manifest)  # the atomic switch to the new generation
    for old in previous:
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging.dir, ignore_errors=True)
    return manifest


# ----------------------------------------------------------------------------------------------
# Reading


def read_manifest(index_dir: str | os.PathLike) -> dict[str, Any]:
    index_dir = Path(index_dir)
    path = index_dir / MANIFEST
    if not path.exists():
        if (index_dir / STAGING).exists():
            raise IndexNotFoundError(
                f"{index_dir} holds an unfinished first run and no index yet; re-run `retrieve index` "
                "with the same settings to finish it."
            )
        raise IndexNotFoundError(f"No index at {index_dir} (no {MANIFEST}). Build one with `retrieve index`.")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexFormatError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{path} is not a retrieve index manifest.")
    version = manifest.get("format_version", 0)
    if not isinstance(version, int):
        raise IndexFormatError(f"{path} is damaged: format_version is {version!r}, not a number.")
    if version > FORMAT_VERSION:
        raise IndexFormatError(f"{index_dir} was written by a newer retrieve (format {version}); upgrade.")
    _check_fields(path, manifest)
    gen = index_dir / manifest["generation"]
    missing = [f for f in ["metadata.parquet", *manifest["vector_files"]] if not (gen / f).exists()]
    if missing:
        raise IndexFormatError(f"{index_dir} is damaged: {gen.name} lacks {', '.join(missing)}.")
    return manifest


# What readers rely on, with the type each must have. A hand-edited or truncated manifest fails
# here with one message instead of a KeyError deep inside a command.
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "root": str,
    "backbone": str,
    "weights": dict,
    "preprocess": dict,
    "dim": int,
    "metric": str,
    "generation": str,
    "vector_files": list,
    "counts": dict,
}


def _check_fields(path: Path, manifest: dict[str, Any]) -> None:
    wrong = [k for k, t in _FIELDS.items() if not isinstance(manifest.get(k), t)]
    if "counts" not in wrong and not isinstance(manifest["counts"].get("indexed"), int):
        wrong.append("counts")
    if wrong:
        raise IndexFormatError(f"{path} is damaged: missing or malformed {', '.join(wrong)}.")
    # Names inside the index folder only: a manifest must not lead readers anywhere else.
    files = manifest["vector_files"]
    if not GENERATION.fullmatch(manifest["generation"]) or not all(
        isinstance(f, str) and re.fullmatch(r"vectors-\d{5,}\.npy", f) for f in files
    ):
        raise IndexFormatError(f"{path} is damaged: it names files outside the index's own layout.")


def generation_dir(index_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    return Path(index_dir) / manifest["generation"]


def load_vectors(index_dir: str | os.PathLike, manifest: dict[str, Any], mmap: bool = True) -> np.ndarray:
    """All vectors in id order (one array; memory-mapped shards are concatenated)."""
    gen = generation_dir(index_dir, manifest)
    try:
        parts = [np.load(gen / f, mmap_mode="r" if mmap else None) for f in manifest["vector_files"]]
    except (OSError, ValueError, EOFError) as exc:
        # numpy's ValueError suggests unpickling the file: the wrong advice for a damaged index.
        why = "not a NumPy array file" if isinstance(exc, ValueError) else str(exc) or type(exc).__name__
        raise IndexFormatError(f"{index_dir} is damaged: a vector file cannot be read ({why}).") from None
    dim = int(manifest["dim"])
    if any(p.ndim != 2 or p.shape[1] != dim or p.dtype != np.float32 for p in parts):
        raise IndexFormatError(f"{index_dir} is damaged: a vector file is not float32 rows of {dim}.")
    if not parts:
        return np.zeros((0, dim), np.float32)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
