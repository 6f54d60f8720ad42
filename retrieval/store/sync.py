"""Syncing an index with its folder: what the committed generation already holds, and what changed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from retrieval.config import SearchConfig
from retrieval.errors import RetrieveError
from retrieval.store.files import conform, read_jsonl
from retrieval.store.manifest import MANIFEST, Manifest
from retrieval.store.staging import Done, Staging

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
}


@dataclass(frozen=True)
class Base:
    """The committed generation a sync starts from: its rows, ledger and vector files."""

    manifest: Manifest
    folder: Path  # gen-NNNNNN
    done: dict[str, Done]  # path -> the file as it was when embedded (or ledgered)
    paths: frozenset[str]  # every path it holds, indexed or ledgered
    rows: dict[str, tuple[int, str | None]]  # indexed path -> (its row, its content hash)

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
    # The staging layout is not the generation's format (`conform` reads every version of that).
    differ = [k for k in run_key if k != "layout" and theirs.get(k) != run_key[k]]
    if differ:
        what = "; ".join(
            f"{_SETTING_WORDS.get(k, k)}: {_differs(theirs.get(k), run_key[k])}" for k in differ[:3]
        )
        raise RetrieveError(
            f"{index_dir} was built with other settings ({what}), so its vectors cannot be mixed "
            "with new ones. Pass «rebuild» to replace it, or give another «index»."
        )
    folder = generation_dir(index_dir, manifest)
    table = conform(pq.read_table(folder / "metadata.parquet"))
    listed = table.select(["path", "bytes", "mtime", "ctime", "inode", "mtime_ns"]).to_pylist()
    done = {row["path"]: Done.of(row) for row in listed}
    paths, hashes = table.column("path").to_pylist(), table.column("hash").to_pylist()
    rows = {p: (r, h) for r, (p, h) in enumerate(zip(paths, hashes, strict=True))}
    ledger = read_jsonl(folder / "skipped.jsonl")
    for row in ledger:
        # A file the scan could not even list (no stat recorded) is looked at again on every run.
        if row.get("bytes"):
            done[row["path"]] = Done.of(row)
    return Base(manifest, folder, done, frozenset(paths) | frozenset(r["path"] for r in ledger), rows)


def built_with(record: dict[str, Any], search: SearchConfig) -> bool:
    """Whether a generation's search index (its manifest record) was asked for with `search`
    (generations from before the settings were recorded: no)."""
    return record.get("settings") == asdict(search)


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
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (old path, new path), same content
    # Indexed files whose size or times moved but whose bytes did not (touched, copied back):
    # counted unchanged, and kept with their vector under the new times, not embedded again.
    touched: list[str] = field(default_factory=list)

    @property
    def nothing_to_do(self) -> bool:
        return not (self.added or self.changed or self.removed or self.renamed or self.touched)

    def counts(self) -> dict[str, int]:
        return {
            "added": len(self.added),
            "changed": len(self.changed),
            "removed": len(self.removed),
            "renamed": len(self.renamed),
            "unchanged": self.unchanged,
        }


def plan_sync(
    entries: Sequence[ImageFileEntry], problems: Sequence[tuple[str, str]], base: Base, verify: bool = False
) -> SyncPlan:
    """Compare a scan with `base` by (size, mtime, ctime, inode); content hashes only where those
    disagree (a touched file keeps its vector), where a new file has the size of a vanished one (a
    move), or for every file with `verify`."""
    from retrieval.images import content_hash

    added, changed, touched = [], [], []
    for e in entries:
        d, known = base.done.get(e.relpath), base.rows.get(e.relpath, (0, None))[1]
        if d is None:
            (changed if e.relpath in base.paths else added).append(e.relpath)
        elif not d.matches(e):
            same = known is not None and d.size == e.size and _hash(e, content_hash) == known
            (touched if same else changed).append(e.relpath)
        elif verify and e.relpath in base.rows and _hash(e, content_hash) != known:
            changed.append(e.relpath)  # same size and times, other bytes (a copy made with cp -p)
    # The scan's own problems (unlisted files, broken links) are ledgered again every run.
    added += [p for p, _ in problems if p not in base.paths]
    present = {e.relpath for e in entries} | {p for p, _ in problems}
    removed = sorted(p for p in base.paths if p not in present)
    renamed = _moves(entries, added, removed, base, content_hash)
    moved_to, moved_from = {n for _, n in renamed}, {o for o, _ in renamed}
    added = [p for p in added if p not in moved_to]
    removed = [p for p in removed if p not in moved_from]
    unchanged = len(entries) + len(problems) - len(added) - len(changed) - len(renamed)
    return SyncPlan(added, changed, removed, unchanged, renamed, touched)


def _hash(e: ImageFileEntry, content_hash: Callable[[Path], str]) -> str | None:
    try:
        return content_hash(e.path)
    except OSError:
        return None  # unreadable now: the embedding pass ledgers it


def _moves(
    entries: Sequence[ImageFileEntry],
    added: list[str],
    removed: list[str],
    base: Base,
    content_hash: Callable[[Path], str],
) -> list[tuple[str, str]]:
    """(old, new) pairs of a vanished indexed file and a new one with its bytes. Only new files the
    size of a vanished one are read, so a sync of added photos hashes nothing."""
    by_size: dict[int, list[str]] = {}
    for p in removed:
        if p in base.rows and base.rows[p][1]:
            by_size.setdefault(base.done[p].size, []).append(p)
    if not by_size:
        return []
    by_path = {e.relpath: e for e in entries}
    moves = []
    for new in added:
        e = by_path.get(new)
        if e is None or e.size not in by_size:
            continue
        digest = _hash(e, content_hash)
        old = next((o for o in by_size[e.size] if base.rows[o][1] == digest), None)
        if old is not None:
            by_size[e.size].remove(old)
            moves.append((old, new))
    return moves


def stage_moves(
    staging: Staging, base: Base, moves: list[tuple[str, str]], entries: Sequence[ImageFileEntry]
) -> None:
    """Stage each moved file under its new path with the vector of its old one: nothing is embedded."""
    if not moves:
        return
    from retrieval.images import file_row
    from retrieval.store.reader import ShardedVectors

    table = conform(pq.read_table(base.folder / "metadata.parquet"))
    by_path = {e.relpath: e for e in entries}
    old_rows = [base.rows[o][0] for o, _ in moves]
    vectors = ShardedVectors(base.vector_files, base.manifest.dim).take(np.asarray(old_rows, np.int64))
    rows = []
    for (_, new), r in zip(moves, old_rows, strict=True):
        e, old = by_path[new], table.slice(r, 1).to_pylist()[0]
        rows.append(old | file_row(e))
    staging.add(vectors, rows, [])


def carried_over(
    staging: Staging, base: Base, plan: SyncPlan, entries: Sequence[ImageFileEntry]
) -> dict[str, Done]:
    """What a sync need not embed: the base generation's files as they were (less those `--verify`
    found changed), and the moved files, staged here with their old vectors."""
    changed = set(plan.changed)
    done = {p: d for p, d in base.done.items() if p not in changed}
    # Moved and touched files: their old vector under their new path and times.
    kept = plan.renamed + [(p, p) for p in plan.touched]
    if kept:
        from retrieval.images import file_row

        stage_moves(staging, base, kept, entries)
        by_path = {e.relpath: e for e in entries}
        done |= {n: Done.of(file_row(by_path[n])) for _, n in kept}
    return done
