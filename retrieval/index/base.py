"""The search-index seam: the VectorIndex protocol every reader searches through, and its kinds.

Exact search is the first member; approximate indexes (IVF / PQ / HNSW) register beside it. The
manifest records `index.record()` as `search_index`, and `load_index` opens whatever kind it names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
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


# kind (the manifest's search_index.type) -> loader(path, metric, record) of a fitted index.
_KINDS: dict[str, Callable[[str | os.PathLike, str, dict[str, Any]], VectorIndex]] = {}


def register_kind(kind: str, loader: Callable[[str | os.PathLike, str, dict[str, Any]], VectorIndex]) -> None:
    if kind in _KINDS:
        raise RetrieveError(f"search index kind {kind!r} is registered twice")
    _KINDS[kind] = loader


def load_index(path: str | os.PathLike, metric: str, record: dict[str, Any], where: str) -> VectorIndex:
    """Open the index file `path` of the kind `record` names; `where` names the index in errors.

    Kinds register when their module is imported: `retrieval.index` imports every one.
    """
    kind = record.get("type", "exact")
    if kind not in _KINDS:
        raise IndexFormatError(
            f"{where} holds a {kind!r} search index, which this version of retrieve cannot read; "
            "upgrade retrieve or rebuild the index."
        )
    return _KINDS[kind](path, metric, record)


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
