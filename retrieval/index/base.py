"""The search-index seam: the VectorIndex protocol every reader searches through, and its kinds.

Exact search is the first member; approximate indexes (IVF / PQ / HNSW) register beside it. The
manifest records `index.record()` as `search_index`, and `load_index` opens whatever kind it names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import numpy as np

from retrieval.errors import IndexFormatError, RetrieveError

METRICS = ("l2", "cosine")


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise RetrieveError(f"Unknown metric {metric!r}; choose one of {', '.join(METRICS)}.")
    return metric


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Unit-length rows (zero rows stay zero), as float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def checked(x: np.ndarray, dim: int | None = None, what: str = "vectors") -> np.ndarray:
    """float32, 2-D, finite, of `dim` columns: FAISS aborts or silently drops rows otherwise."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise RetrieveError(f"expected a 2-D array of {what}, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise RetrieveError(f"the {what} contain NaN or infinity")
    if dim is not None and x.shape[1] != dim:
        raise RetrieveError(f"{what} have {x.shape[1]} dims, the index has {dim}")
    return x


def exact_distances(rows: np.ndarray, q: np.ndarray, metric: str) -> np.ndarray:
    """Distances of `rows` [n, k, d] to their queries `q` [n, 1, d], as ExactIndex reports them."""
    if metric == "l2":
        diff = rows - q  # direct differences: no cancellation, unlike |x|^2 + |y|^2 - 2xy
        return np.sqrt(np.einsum("qkd,qkd->qk", diff, diff))
    return 1.0 - np.einsum("qkd,qkd->qk", rows, np.broadcast_to(q, rows.shape))


class FaissSized:
    """`ntotal` and `dim` of the FAISS index a kind holds in `index_` (shared by the kinds)."""

    index_: Any

    @property
    def ntotal(self) -> int:
        return int(self.index_.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index_.d)


class RowSource(Protocol):
    """Stored vectors by row: an array, or the generation's memory-mapped shards."""

    def __len__(self) -> int: ...
    def take(self, ids: np.ndarray) -> np.ndarray: ...
    def blocks(self) -> Iterator[np.ndarray]: ...


class ArrayRows:
    """A RowSource over one array (or memmap), without copying it."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def take(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.x[np.asarray(ids, np.int64)], np.float32)

    def blocks(self, rows: int = 65536) -> Iterator[np.ndarray]:
        for start in range(0, len(self.x), rows):
            yield np.asarray(self.x[start : start + rows], np.float32)


class VectorIndex(Protocol):
    """What readers (query, eval, map, sheet) need of a fitted index; the scikit-learn contract."""

    metric: str

    def fit(self, blocks: np.ndarray | Iterable[np.ndarray]) -> VectorIndex: ...
    def add(self, x: np.ndarray) -> None: ...
    def search(self, xq: np.ndarray, k: int, refine: bool = True) -> tuple[np.ndarray, np.ndarray]: ...
    def reconstruct(self, ids: np.ndarray) -> np.ndarray: ...
    def save(self, path: str | os.PathLike) -> None: ...
    def record(self) -> dict[str, Any]: ...

    @property
    def ntotal(self) -> int: ...

    @property
    def dim(self) -> int: ...


# kind (the manifest's search_index.type) -> loader(path, metric, record, rows) of a fitted index.
Loader = Callable[[str | os.PathLike, str, dict[str, Any], RowSource | None], VectorIndex]
_KINDS: dict[str, Loader] = {}


def register_kind(kind: str, loader: Loader) -> None:
    if kind in _KINDS:
        raise RetrieveError(f"search index kind {kind!r} is registered twice")
    _KINDS[kind] = loader


def load_index(
    path: str | os.PathLike,
    metric: str,
    record: dict[str, Any],
    where: str,
    rows: RowSource | None = None,
) -> VectorIndex:
    """Open the index file `path` of the kind `record` names; `where` names the index in errors.

    `rows` are the stored vectors, which approximate kinds re-rank from.

    Kinds register when their module is imported: `retrieval.index` imports every one.
    """
    kind = record.get("type", "exact")
    if kind not in _KINDS:
        raise IndexFormatError(
            f"{where} holds a {kind!r} search index, which this version of retrieve cannot read; "
            "upgrade retrieve or rebuild the index."
        )
    return _KINDS[kind](path, metric, record, rows)


def drop_self(
    ids: np.ndarray, dist: np.ndarray, self_ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Leave each query's own id out of its row of k + 1 results (the last one when it is absent).

    Shared by leave-one-out evaluation and the map's neighbour lists; exactly
    `Index.search_ids(exclude_self=True)`: a duplicate image ranked ahead of the query
    itself stays; missing neighbours (-1) are dropped; rows are padded with -1 / inf.
    """
    keep = (ids != self_ids[:, None]) & (ids >= 0)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept columns first, in rank order
    out_ids = np.take_along_axis(ids, order, axis=1)
    out_d = np.take_along_axis(dist, order, axis=1).astype(np.float32)
    kept = np.take_along_axis(keep, order, axis=1)
    out_ids[~kept] = -1
    out_d[~kept] = np.inf
    return out_ids, out_d
