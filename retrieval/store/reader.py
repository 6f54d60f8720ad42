"""Reading an index directory: its manifest, checked in one place, and its vectors."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from retrieval.errors import IndexFormatError, IndexNotFoundError
from retrieval.store.manifest import MANIFEST, Manifest
from retrieval.store.staging import STAGING


def read_manifest(index_dir: str | os.PathLike) -> Manifest:
    """The checked manifest of `index_dir`, whose live generation holds every file it names."""
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
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexFormatError(f"{path} is not readable JSON: {exc}") from None
    manifest = Manifest.from_dict(raw, where=str(path), folder=str(index_dir))
    gen = index_dir / manifest.generation
    missing = [f for f in ["metadata.parquet", *manifest.vector_files] if not (gen / f).exists()]
    if missing:
        raise IndexFormatError(f"{index_dir} is damaged: {gen.name} lacks {', '.join(missing)}.")
    return manifest


def generation_dir(index_dir: str | os.PathLike, manifest: Manifest) -> Path:
    return Path(index_dir) / manifest.generation


def _open_shards(files: list[Path], dim: int, where: str, mmap: bool = True) -> list[np.ndarray]:
    """The vector shard files as arrays (memory-mapped), checked to be float32 rows of `dim`."""
    try:
        parts = [np.load(f, mmap_mode="r" if mmap else None) for f in files]
    except (OSError, ValueError, EOFError) as exc:
        # numpy's ValueError suggests unpickling the file: the wrong advice for a damaged index.
        why = "not a NumPy array file" if isinstance(exc, ValueError) else str(exc) or type(exc).__name__
        raise IndexFormatError(f"{where} is damaged: a vector file cannot be read ({why}).") from None
    if any(p.ndim != 2 or p.shape[1] != dim or p.dtype != np.float32 for p in parts):
        raise IndexFormatError(f"{where} is damaged: a vector file is not float32 rows of {dim}.")
    return parts


def load_vectors(index_dir: str | os.PathLike, manifest: Manifest, mmap: bool = True) -> np.ndarray:
    """All vectors in row order (one array; memory-mapped shards are concatenated)."""
    gen = generation_dir(index_dir, manifest)
    parts = _open_shards([gen / f for f in manifest.vector_files], manifest.dim, str(index_dir), mmap)
    if not parts:
        return np.zeros((0, manifest.dim), np.float32)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class ShardedVectors:
    """The generation's vector shards as one RowSource: memory-mapped, read only where asked.

    Re-ranking an approximate search reads a few hundred rows per query from here; nothing loads
    the whole matrix (a 1M x 512 index is 2 GB of shards). `where` names the index in errors.
    """

    def __init__(self, files: list[Path], dim: int, where: str | None = None) -> None:
        self.parts = _open_shards(files, dim, where or (str(Path(files[0]).parent) if files else "?"))
        self.dim = dim
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"row ids outside 0..{len(self) - 1}")
        out = np.empty((len(ids), self.dim), np.float32)
        shard = np.searchsorted(self.starts, ids, side="right") - 1
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = self.parts[s][ids[mask] - self.starts[s]]
        return out

    def blocks(self) -> Iterator[np.ndarray]:
        for part in self.parts:
            yield np.asarray(part, np.float32)


def shard_rows(index_dir: str | os.PathLike, manifest: Manifest) -> ShardedVectors:
    """The live generation's vectors as a RowSource (see ShardedVectors)."""
    gen = generation_dir(index_dir, manifest)
    return ShardedVectors([gen / f for f in manifest.vector_files], manifest.dim, str(index_dir))
