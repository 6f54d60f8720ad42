"""Staging: the resumable shards of a run in progress, reused by a re-run with the same settings."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retrieval.atomic import write_json
from retrieval.store.files import METADATA_SCHEMA, conform, read_jsonl, write_jsonl, write_npy, write_parquet

if TYPE_CHECKING:
    from retrieval.images import ImageFileEntry

STAGING = ".staging"


@dataclass(frozen=True)
class Done:
    """A file already handled (embedded or ledgered) as it was then, keyed by relpath."""

    size: int
    mtime: float
    ctime: float
    inode: int | None = None  # None: recorded before inodes were
    mtime_ns: int | None = None

    @classmethod
    def of(cls, row: dict[str, Any]) -> Done:
        """From a metadata or ledger row (of any version: missing fields are unknown)."""
        return cls(row["bytes"], row["mtime"], row.get("ctime") or 0.0, row.get("inode"), row.get("mtime_ns"))

    def matches(self, e: ImageFileEntry) -> bool:
        """Whether `e` is still that file: size, ctime, mtime (in ns where both know it) and inode
        (where both know it). A file replaced by `mv`, copied over or touched fails one of them."""
        if (self.size, self.ctime) != (e.size, e.ctime):
            return False
        if self.mtime_ns is not None and e.mtime_ns:
            if self.mtime_ns != e.mtime_ns:
                return False
        elif self.mtime != e.mtime:
            return False
        return self.inode is None or not e.inode or self.inode == e.inode


class Staging:
    """Shards of the run in progress. A shard is valid once its metadata file exists (written last)."""

    def __init__(
        self,
        index_dir: Path,
        key: dict[str, Any],
        shard_rows: int,
        flush_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dir = index_dir / STAGING
        self.key = key
        self.shard_rows = shard_rows
        # A shard is also written once this much time has passed since the last one, so a kill on
        # a slow machine (VGG on a CPU: 4,096 images is a quarter of an hour) loses at most that.
        self.flush_seconds = flush_seconds
        self._clock = clock
        self._last_flush = clock()
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
            cols = ["path", "bytes", "mtime", "ctime", "inode", "mtime_ns"]
            table = conform(pq.read_table(shard.with_suffix(".parquet"))).select(cols)
            for row in table.to_pylist():
                done[row["path"]] = Done.of(row)
            for row in read_jsonl(shard.with_suffix(".skipped.jsonl")):
                if row.get("crash"):
                    # It crashed the decoder: decoded again, in case the machine was at fault.
                    done.pop(row["path"], None)
                    continue
                done[row["path"]] = Done.of(row)
        self._next = 1 + max((int(s.stem.split("-")[1]) for s in self.shards()), default=-1)
        return done

    def drop_if_empty(self) -> None:
        """Remove the staging folder when no shard has been written to it."""
        if self.dir.exists() and not self.shards():
            shutil.rmtree(self.dir)

    def shards(self) -> list[Path]:
        """Valid shards (stem paths without suffix), in write order."""
        if not self.dir.exists():
            return []
        return sorted(p.with_suffix("") for p in self.dir.glob("shard-*.parquet"))

    def add(self, vectors: np.ndarray, rows: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> None:
        block = np.asarray(vectors, dtype=np.float32) if len(vectors) else None
        self._pending.append((block, list(rows) if block is not None else [], list(skipped)))
        due = self.flush_seconds is not None and self._clock() - self._last_flush >= self.flush_seconds
        if due or sum(len(r) for _, r, _ in self._pending) >= self.shard_rows:
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
        self._last_flush = self._clock()
