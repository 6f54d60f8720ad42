"""Syncing an index with its folder: what the committed generation already holds, and what changed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

from retrieval.errors import RetrieveError
from retrieval.store.files import read_jsonl
from retrieval.store.manifest import MANIFEST, Manifest
from retrieval.store.staging import Done

if TYPE_CHECKING:
    from retrieval.images import ImageFileEntry

# The settings that make two runs' vectors comparable, in the words of `retrieve index`'s options.
_SETTING_WORDS = {
    "root": "the indexed folder",
    "backbone": "«backbone»",
    "layer": "«layer»",
    "weights": "«weights»",
    "preprocess": "the preprocessing",
    "dim": "the dimension",
    "tta": "«tta»",
    "dtype": "«dtype»",
    "layout": "the staging layout (another retrieve version)",
}


@dataclass(frozen=True)
class Base:
    """The committed generation a sync starts from: its rows, ledger and vector files."""

    manifest: Manifest
    folder: Path  # gen-NNNNNN
    done: dict[str, Done]  # path -> the file as it was when embedded (or ledgered)
    paths: frozenset[str]  # every path it holds, indexed or ledgered

    @property
    def vector_files(self) -> list[Path]:
        return [self.folder / f for f in self.manifest.vector_files]


def committed_base(index_dir: Path, run_key: dict[str, Any]) -> Base | None:
    """The live generation to sync from, or None (no index yet). A generation made with settings
    that give other vectors is refused: mixing them would be silently wrong."""
    from retrieval.store.reader import generation_dir, read_manifest

    if not (index_dir / MANIFEST).exists():
        return None
    manifest = read_manifest(index_dir)
    theirs = manifest.run_key()
    differ = [k for k in run_key if theirs.get(k) != run_key[k]]
    if differ:
        what = "; ".join(
            f"{_SETTING_WORDS.get(k, k)}: {_differs(theirs.get(k), run_key[k])}" for k in differ[:3]
        )
        raise RetrieveError(
            f"{index_dir} was built with other settings ({what}), so its vectors cannot be mixed "
            "with new ones. Pass «rebuild» to replace it, or give another «index»."
        )
    folder = generation_dir(index_dir, manifest)
    table = pq.read_table(folder / "metadata.parquet", columns=["path", "bytes", "mtime", "ctime"])
    cols = [table.column(c).to_pylist() for c in ("path", "bytes", "mtime", "ctime")]
    done = {p: Done(b, m, c) for p, b, m, c in zip(*cols, strict=True)}
    for row in read_jsonl(folder / "skipped.jsonl"):
        # A file the scan could not even list (no stat recorded) is looked at again on every run.
        if row.get("bytes"):
            done[row["path"]] = Done(row["bytes"], row["mtime"], row.get("ctime", 0.0))
    paths = frozenset(cols[0]) | frozenset(r["path"] for r in read_jsonl(folder / "skipped.jsonl"))
    return Base(manifest, folder, done, paths)


def _differs(theirs: Any, ours: Any) -> str:
    """The index's value -> this run's, field by field for records (weights, preprocessing)."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        keys = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
        return ", ".join(f"{k} {theirs.get(k)!r} -> {ours.get(k)!r}" for k in keys[:3])
    return f"{theirs!r} -> {ours!r}"


@dataclass(frozen=True)
class SyncPlan:
    """How the folder differs from the committed generation (all empty but `unchanged` on a no-op)."""

    added: list[str]
    changed: list[str]
    removed: list[str]
    unchanged: int

    @property
    def nothing_to_do(self) -> bool:
        return not (self.added or self.changed or self.removed)

    def counts(self) -> dict[str, int]:
        return {
            "added": len(self.added),
            "changed": len(self.changed),
            "removed": len(self.removed),
            "unchanged": self.unchanged,
        }


def plan_sync(entries: Sequence[ImageFileEntry], problems: Sequence[tuple[str, str]], base: Base) -> SyncPlan:
    """Compare a scan with `base` by (size, mtime, ctime): no file is read."""
    added, changed = [], []
    for e in entries:
        d = base.done.get(e.relpath)
        if d is None:
            (changed if e.relpath in base.paths else added).append(e.relpath)
        elif (d.size, d.mtime, d.ctime) != (e.size, e.mtime, e.ctime):
            changed.append(e.relpath)
    # The scan's own problems (unlisted files, broken links) are ledgered again every run.
    added += [p for p, _ in problems if p not in base.paths]
    present = {e.relpath for e in entries} | {p for p, _ in problems}
    removed = sorted(p for p in base.paths if p not in present)
    unchanged = len(entries) + len(problems) - len(added) - len(changed)
    return SyncPlan(added, changed, removed, unchanged)
