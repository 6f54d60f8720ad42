"""Exact nearest-neighbour search with FAISS (IndexFlatL2, or inner product on unit vectors): the first VectorIndex."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import RetrieveError, first_line
from retrieval.index.base import (
    FaissSized,
    check_metric,
    checked,
    exact_distances,
    normalize_rows,
    register_kind,
)


class ExactIndex(FaissSized):
    """Exact search: `IndexFlatL2` for L2, inner product on unit vectors for cosine.

    Follows the scikit-learn contract: `fit` returns self, learned state ends in `_`.
    `search` returns (distances, ids) with true Euclidean distances for `l2` (FAISS gives squared
    ones) and `1 - cosine similarity` for `cosine`; missing neighbours (k > n) have id -1.
    """

    def __init__(self, *, metric: str = "l2") -> None:
        self.metric = metric

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        x = checked(x)  # NaN: FAISS would return no neighbours at all, silently
        return normalize_rows(x) if self.metric == "cosine" else x

    def fit(self, blocks: np.ndarray | Iterable[np.ndarray]) -> ExactIndex:
        """Add vectors given as one array or as an iterator of blocks (data larger than RAM)."""
        check_metric(self.metric)
        self.index_ = None
        for block in [blocks] if isinstance(blocks, np.ndarray) else blocks:
            self.add(block)
        if self.index_ is None:
            raise RetrieveError("no vectors to index")
        return self

    def add(self, x: np.ndarray) -> None:
        """Append rows (ids continue from `ntotal`); the first block fixes the dimension."""
        import faiss

        block = self._prepare(x)
        if getattr(self, "index_", None) is None:
            d = block.shape[1]
            self.index_ = faiss.IndexFlatL2(d) if self.metric == "l2" else faiss.IndexFlatIP(d)
        elif block.shape[1] != self.dim:  # FAISS would abort the process on an assertion
            raise RetrieveError(f"vectors have {block.shape[1]} dims, the index has {self.dim}")
        self.index_.add(block)

    def record(self) -> dict[str, Any]:
        """What the manifest records as `search_index`: enough for `load_index` to open the file."""
        return {"type": "exact", "faiss": type(self.index_).__name__, **getattr(self, "tuning_", {})}

    def search(self, xq: np.ndarray, k: int, refine: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest rows of each query; `refine` recomputes the k distances exactly (see below)."""
        if k < 1:
            raise RetrieveError("k must be at least 1")
        xq = self._prepare(xq)
        if xq.shape[1] != self.dim:
            raise RetrieveError(f"query vectors have {xq.shape[1]} dims, the index has {self.dim}")
        dist, ids = self.index_.search(xq, k)
        if refine:
            return self._refine(xq, ids)
        if self.metric == "l2":
            dist = np.sqrt(np.maximum(dist, 0.0))
        else:
            dist = 1.0 - dist
        dist[ids < 0] = np.inf
        return dist.astype(np.float32), ids.astype(np.int64)

    def _refine(self, xq: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact distances to the k returned rows, re-sorted (stable, so FAISS's order among ties).

        FAISS's batched kernel (20+ queries) computes |x|^2 + |y|^2 - 2xy in float32: for vectors
        of large norm, a near-duplicate's distance is off by percents and the query's own row comes
        back at 0.01 instead of 0, differently for each batch size. Cost: k gathered rows a query.
        """
        ids = ids.astype(np.int64)
        dist = np.empty(ids.shape, np.float32)
        n, k = ids.shape
        # Memory stays at ~2 x 4M floats whatever n, k and dim: blocks of queries x neighbours.
        cells = 1 << 22
        kc = max(1, min(k, cells // self.dim))
        qc = max(1, cells // (kc * self.dim))
        for q0 in range(0, n, qc):
            q = xq[q0 : q0 + qc, None, :]
            for k0 in range(0, k, kc):
                block = ids[q0 : q0 + qc, k0 : k0 + kc]
                valid = block >= 0
                rows = self.index_.reconstruct_batch(np.where(valid, block, 0).ravel())
                rows = rows.reshape(*block.shape, -1)
                d = exact_distances(rows, q, self.metric)  # under cosine both sides are unit already
                dist[q0 : q0 + qc, k0 : k0 + kc] = np.where(valid, d, np.inf)
        order = np.argsort(dist, axis=1, kind="stable")
        return np.take_along_axis(dist, order, axis=1), np.take_along_axis(ids, order, axis=1)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored rows `ids` (unit length under cosine), without copying the rest."""
        return self.index_.reconstruct_batch(np.asarray(ids, dtype=np.int64))

    def save(self, path: str | os.PathLike) -> None:
        import faiss

        faiss.write_index(self.index_, str(path))

    @classmethod
    def load(cls, path: str | os.PathLike, *, metric: str) -> ExactIndex:
        import faiss

        obj = cls(metric=metric)
        try:
            obj.index_ = faiss.read_index(str(Path(path)))
        except RuntimeError as exc:
            raise RetrieveError(f"cannot read FAISS index {path}: {first_line(exc)}") from None
        return obj


def brute_force(
    blocks: Iterable[np.ndarray], xq: np.ndarray, k: int, metric: str, slack: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of `xq` over vectors given block by block (memory: one block at a time).

    Ids are row positions across the blocks. Each block's best `k + slack` are kept and their
    distances recomputed directly before the final sort, so float32 cancellation in FAISS's
    batched kernel cannot reorder near-ties at the k-th place. `xq` must be prepared already
    (unit rows under cosine); the blocks are normalised here.
    """
    import faiss

    check_metric(metric)
    kind = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    xq = np.ascontiguousarray(xq, np.float32)
    best_d = np.full((len(xq), 0), np.inf, np.float32)
    best_i = np.full((len(xq), 0), -1, np.int64)
    offset = 0
    for block in blocks:
        block = np.ascontiguousarray(block, np.float32)
        if metric == "cosine":
            block = normalize_rows(block)
        kk = min(k + slack, len(block))
        if kk:
            _, ids = faiss.knn(xq, block, kk, metric=kind)
            rows = block[ids]  # [q, kk, d]
            dist = exact_distances(rows, xq[:, None, :], metric).astype(np.float32)
            best_d = np.concatenate([best_d, dist], axis=1)
            best_i = np.concatenate([best_i, ids.astype(np.int64) + offset], axis=1)
            keep = np.argsort(best_d, axis=1, kind="stable")[:, : k + slack]
            best_d = np.take_along_axis(best_d, keep, axis=1)
            best_i = np.take_along_axis(best_i, keep, axis=1)
        offset += len(block)
    order = np.lexsort((best_i, best_d), axis=1)[:, :k]  # ties: lower id first, like FAISS
    dist, ids = np.take_along_axis(best_d, order, axis=1), np.take_along_axis(best_i, order, axis=1)
    if dist.shape[1] < k:  # fewer rows than k
        pad = k - dist.shape[1]
        dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=np.inf)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return dist, ids


register_kind("exact", lambda path, metric, record, rows=None: ExactIndex.load(path, metric=metric))
