"""The Python API: open an index and search it by image file, by vector, or by an indexed image's id."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from retrieval.errors import BadImageError, IndexFormatError, RetrieveError
from retrieval.paths import user_path
from retrieval.query import Hit, Searcher, check_k
from retrieval.store import generation_dir, load_vectors, read_jsonl, read_manifest, shard_rows

__all__ = ["Hit", "Index", "check_k", "open_index"]

T = TypeVar("T")


class Index:
    """A read-only view of an index directory; the backbone is loaded on first image query."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = user_path(path).absolute()
        self.manifest = read_manifest(self.path)
        self.dir = generation_dir(self.path, self.manifest)
        self._opened = _identity(self.dir)

    # -- data ---------------------------------------------------------------------------------
    # Every read of the generation's files goes through `_read`; what is read is kept for the life of
    # the handle (vectors stay memory-mapped), so a handle keeps answering from the generation it
    # opened after `retrieve index` commits a new one (Linux keeps mapped files of removed folders).

    def _read(self, read: Callable[[], T]) -> T:
        """`read()`, with a damaged-index error explained when the cause is a newer generation."""
        try:
            if _identity(self.dir) != self._opened:
                # The index folder was deleted and built again: its first generation has the name
                # of the one opened here, and its files would silently mix with what is cached.
                raise IndexFormatError(f"{self.dir} is not the generation opened here")
            return read()
        except IndexFormatError:
            try:
                now = read_manifest(self.path).generation
            except RetrieveError:
                now = "none"
            if now != self.manifest.generation or _identity(self.dir) != self._opened:
                raise IndexFormatError(
                    f"{self.path} was rebuilt since it was opened here ({self.manifest.generation} -> "
                    f"{now}); open it again."
                ) from None
            raise

    @cached_property
    def metadata(self):  # -> pyarrow.Table
        return self._read(self._read_metadata)

    def _read_metadata(self):  # -> pyarrow.Table
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(self.dir / "metadata.parquet")
        except (OSError, pa.ArrowException) as exc:
            raise IndexFormatError(f"{self.path} is damaged: its metadata cannot be read ({exc}).") from None
        if table.num_rows != len(self) or not {"path", "label"} <= set(table.column_names):
            raise IndexFormatError(f"{self.path} is damaged: its metadata does not match the manifest.")
        return table

    @cached_property
    def paths(self) -> list[str]:
        return self.metadata.column("path").to_pylist()

    @cached_property
    def labels(self) -> list[str]:
        return self.metadata.column("label").to_pylist()

    @cached_property
    def _ids_by_path(self) -> dict[str, int]:  # path -> row
        return {p: i for i, p in enumerate(self.paths)}

    @cached_property
    def ids(self) -> np.ndarray:
        """The stable id of each row: what `Hit.id` and an int query mean. A first build numbers
        the rows 0..n-1; a sync keeps each unchanged (or moved) file's id and never reuses one."""
        if "id" not in self.metadata.column_names:
            return np.arange(len(self), dtype=np.int64)
        return self.metadata.column("id").to_numpy().astype(np.int64)

    @cached_property
    def _rows_by_id(self) -> dict[int, int] | None:  # None: ids are the rows
        ids = self.ids
        if np.array_equal(ids, np.arange(len(ids))):
            return None
        return {int(i): r for r, i in enumerate(ids)}

    @property
    def root(self) -> Path:
        return Path(self.manifest.root)

    @property
    def metric(self) -> str:
        return self.manifest.metric

    @property
    def dim(self) -> int:
        return self.manifest.dim

    def __len__(self) -> int:
        return self.manifest.counts.indexed

    def vectors(self) -> np.ndarray:
        """All vectors, rows in path order, `ids[i]` row i's id (memory-mapped when the index has one shard; read once)."""
        return self._vectors

    @cached_property
    def _vectors(self) -> np.ndarray:
        return self._read(lambda: load_vectors(self.path, self.manifest))

    def skipped(self) -> list[dict[str, Any]]:
        return self._read(self._read_skipped)

    def _read_skipped(self) -> list[dict[str, Any]]:
        if not self.dir.is_dir():  # read_jsonl takes a missing file for an empty ledger
            raise IndexFormatError(f"{self.path} is damaged: {self.dir.name} is missing.")
        return read_jsonl(self.dir / "skipped.jsonl")

    @cached_property
    def vector_index(self):  # -> VectorIndex
        """The generation's search index (exact or approximate, as the manifest records)."""
        return self._read(self._load_vector_index)

    def _load_vector_index(self):  # -> VectorIndex
        from retrieval.index import load_index

        if not (self.dir / "index.faiss").exists():
            raise IndexFormatError(f"{self.path} lacks its FAISS index file.")
        record = self.manifest.search_index
        # Approximate kinds re-rank from the memory-mapped shards; exact search holds its vectors.
        rows = None if record.get("type", "exact") == "exact" else self.rows
        index = load_index(self.dir / "index.faiss", self.metric, record, where=str(self.path), rows=rows)
        if rows is not None and self._rows_by_id is not None:
            index.attach(rows, self.ids)  # updated in place by a sync: FAISS holds the stable ids
        return index

    @cached_property
    def rows(self):  # -> ShardedVectors
        """The stored vectors as a RowSource: memory-mapped shards, read row by row where asked."""
        return self._read(lambda: shard_rows(self.path, self.manifest))

    def _search(self, x: np.ndarray, k: int, exact: bool) -> tuple[np.ndarray, np.ndarray]:
        """The index's answer, or with `exact` (and an approximate index) brute force over the shards."""
        if not exact or self.manifest.search_index.get("type", "exact") == "exact":
            return self.vector_index.search(x, k)
        from retrieval.index import brute_force, checked, normalize_rows

        x = checked(x, self.dim, "query vectors")
        xq = normalize_rows(x) if self.metric == "cosine" else x
        dist, ids = brute_force(self.rows.blocks(), xq, k, self.metric)
        return dist.astype(np.float32), ids

    # -- lookups ------------------------------------------------------------------------------
    def id_of(self, ref: str | int | os.PathLike) -> int:
        """The row of an id (an int), a path relative to the root, or a path to a file under the root."""
        if isinstance(ref, int | np.integer):
            rows = self._rows_by_id
            row = (int(ref) if 0 <= int(ref) < len(self) else None) if rows is None else rows.get(int(ref))
            if row is None:
                raise RetrieveError(f"id {ref} is not in the index (it holds {len(self)} images).")
            return row
        s = str(ref)
        # isdigit() alone takes "²" and "٣", which int() refuses or reads as another number.
        if s.isascii() and s.isdigit() and s not in self._ids_by_path:
            return self.id_of(int(s))
        candidates = [s.replace(os.sep, "/"), *self._under_root(s)]
        # A path like images/dogs/12.jpg given from the root's parent: strip leading components.
        parts = Path(s).parts
        candidates += ["/".join(parts[i:]) for i in range(len(parts))]
        for c in candidates:
            if c in self._ids_by_path:
                return self._ids_by_path[c]
        raise RetrieveError(f"{s!r} is not in the index {self.path} (paths are relative to {self.root}).")

    def _under_root(self, ref: str | os.PathLike) -> list[str]:
        """`ref` as paths relative to the root: as given (made absolute) and with links resolved."""
        p = user_path(ref)
        try:
            bases: tuple[Path, ...] = (p.absolute(), p.resolve())
        except (RuntimeError, OSError):  # a symlink loop, or a path too long to resolve
            bases = (p.absolute(),)
        return [b.relative_to(self.root).as_posix() for b in bases if b.is_relative_to(self.root)]

    def indexed(self, ref: str | os.PathLike) -> int | None:
        """The id of `ref` when it names an indexed image exactly (no suffix matching), else None."""
        candidates = [str(ref).replace(os.sep, "/")]
        p = user_path(ref)
        if p.is_absolute() or p.exists():
            candidates += self._under_root(ref)
        return next((self._ids_by_path[c] for c in candidates if c in self._ids_by_path), None)

    def hit(self, rank: int, i: int, distance: float) -> Hit:
        """Row `i` as the `rank`-th hit: its stable id, path and label."""
        return Hit(rank, int(self.ids[i]), float(distance), self.paths[i], self.labels[i])

    # -- search -------------------------------------------------------------------------------
    def search_vectors(self, x: np.ndarray, k: int = 10, exact: bool = False) -> list[list[Hit]]:
        """Neighbours of each row of `x` (already embedded with this index's backbone).

        `exact` answers by brute force over the stored vectors when the index is approximate.
        """
        k = check_k(k)
        if np.iscomplexobj(x):
            raise RetrieveError("query vectors must be real numbers, not complex.")
        try:
            x = np.atleast_2d(np.asarray(x, np.float32))
        except (TypeError, ValueError) as exc:
            raise RetrieveError(f"query vectors must be a numeric array ({exc}).") from None
        dist, ids = self._search(x, min(k, len(self)), exact)
        return self._hits(ids, dist)

    def _hits(self, ids: np.ndarray, dist: np.ndarray) -> list[list[Hit]]:
        return [
            [self.hit(r + 1, i, d) for r, (i, d) in enumerate(zip(row_ids, row_d, strict=True)) if i >= 0]
            for row_ids, row_d in zip(ids, dist, strict=True)
        ]

    def search_ids(
        self, refs: list[str | int], k: int = 10, exclude_self: bool = True, exact: bool = False
    ) -> list[list[Hit]]:
        """Neighbours of images already in the index, by id or path; the image itself is left out."""
        from retrieval.index import drop_self

        k = check_k(k)
        refs = [refs] if isinstance(refs, str | int | np.integer | os.PathLike) else refs
        ids = np.array([self.id_of(r) for r in refs], dtype=np.int64)
        x = self.vector_index.reconstruct(ids)  # the rows asked for, not a copy of every shard
        if not exclude_self:
            return self.search_vectors(x, k, exact=exact)
        dist, nb = self._search(x, min(k + 1, len(self)), exact)
        nb, dist = drop_self(nb, dist, ids, k)
        return self._hits(nb, dist)

    def embed(
        self,
        paths: list[str | os.PathLike],
        device: str = "auto",
        on_bad: Callable[[int, BadImageError], None] | None = None,
    ) -> np.ndarray:
        """Embed image files exactly as the database was: same backbone, weights and preprocessing.

        A bad file raises BadImageError naming it; with `on_bad`, it is reported there (its position
        in `paths`, the error) and left out of the result instead.
        """
        from retrieval.device import resolve_runtime
        from retrieval.embed import embed_files, prepare_model

        backbone = self.backbone()
        runtime = resolve_runtime(device, self.manifest.dtype)
        tta = self.manifest.tta
        return embed_files(prepare_model(backbone, runtime), runtime, paths, tta=tta, on_bad=on_bad)

    def search_paths(
        self, paths: list[str | os.PathLike], k: int = 10, device: str = "auto", exact: bool = False
    ) -> list[list[Hit]]:
        k = check_k(k)
        paths = [paths] if isinstance(paths, str | os.PathLike) else paths
        return self.search_vectors(self.embed(paths, device=device), k, exact=exact)

    def search(self, query: Any, k: int = 10) -> list[list[Hit]]:
        """Dispatch on the type (see `Searcher.search`): vectors, ids, indexed paths or image files."""
        return Searcher(self).search(query, k)

    # -- model --------------------------------------------------------------------------------
    def backbone(self):  # -> Backbone
        """The backbone the index was built with; refuses weights that differ from the recorded hash."""
        from retrieval.embed import load_recorded_backbone

        return load_recorded_backbone(self.manifest)


def _identity(generation: Path) -> tuple[int, int, int] | None:
    """Which generation this is, not just its name; None if it is gone.

    Read from its metadata file, which is never written again once committed (the folder itself
    changes when a map caches into it): (device, inode, mtime).
    """
    try:
        st = os.stat(generation / "metadata.parquet")
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


def open_index(path: str | os.PathLike) -> Index:
    """Open the index at `path` (the CLI remembers the last one built; the library does not)."""
    if not isinstance(path, str | os.PathLike):
        raise RetrieveError(f"open_index takes the path of an index folder, not {type(path).__name__}.")
    return Index(path)
