"""Approximate search over any `faiss.index_factory` string, re-ranked from the stored vectors: a VectorIndex."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from retrieval.errors import RetrieveError, first_line
from retrieval.index.base import (
    ArrayRows,
    FaissSized,
    RowSource,
    check_metric,
    checked,
    exact_distances,
    normalize_rows,
    register_kind,
)

# The operating point: IVF probes, HNSW beam width, and how many candidates a query re-ranks (x k).
PARAMS = ("nprobe", "efSearch", "rerank")


class FactoryIndex(FaissSized):
    """IVF / PQ / HNSW search built from a FAISS factory string, with stable int64 ids.

    Follows the scikit-learn contract (`fit` returns self, learned state ends in `_`). Ids are given
    to FAISS with `add_with_ids` (an IDMap2 around indexes that cannot store them), never taken
    from row positions. `search(refine=True)` fetches `rerank * k` candidates and orders them by
    exact distances computed from `rows_` (the memory-mapped shards once saved), so the reported
    distances are the true ones whatever the codes lose.
    """

    def __init__(self, *, factory: str, metric: str = "l2", params: dict[str, Any] | None = None) -> None:
        self.factory = factory
        self.metric = metric
        self.params = dict(params or {})

    # -- building -----------------------------------------------------------------------------
    def _new(self, d: int):  # -> faiss.Index
        import faiss

        check_metric(self.metric)
        kind = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        try:
            index = faiss.index_factory(d, self.factory, kind)
        except RuntimeError as exc:
            raise RetrieveError(f"FAISS cannot build {self.factory!r}: {first_line(exc)}") from None
        if faiss.try_extract_index_ivf(index) is None:
            index = faiss.IndexIDMap2(index)  # HNSW and Flat keep no ids of their own
        return index

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        x = checked(x, getattr(self, "d_", None))
        return normalize_rows(x) if self.metric == "cosine" else x

    def train(self, sample: np.ndarray, quantizer: Any = None) -> FactoryIndex:
        """Train on `sample`; `quantizer`, an already trained IVF coarse quantizer, is reused as is."""
        sample = self._prepare(sample)
        self.d_ = sample.shape[1]
        self.index_ = self._new(self.d_)
        if quantizer is not None:
            from faiss.contrib.ivf_tools import replace_ivf_quantizer

            ivf = _ivf(self.index_)
            if ivf is None or ivf.nlist != quantizer.ntotal:
                raise RetrieveError(f"{self.factory!r} cannot share a quantizer of {quantizer.ntotal} lists")
            replace_ivf_quantizer(ivf, quantizer)  # FAISS then trains only what follows the lists
        self.index_.train(sample)
        self.next_id_ = 0
        self.trained_on_ = len(sample)
        return self

    def fit(
        self, blocks: np.ndarray | Iterable[np.ndarray], *, sample: np.ndarray | None = None
    ) -> FactoryIndex:
        """Train on `sample` (default: a seeded sample of `blocks`, when it is one array), add all."""
        if sample is None:
            if not isinstance(blocks, np.ndarray):
                raise RetrieveError("an approximate index fitted on blocks needs a training sample")
            sample = seeded_sample(blocks, 256_000)
        self.train(sample)
        if isinstance(blocks, np.ndarray):
            self.rows_: RowSource = ArrayRows(blocks)
            self.add(blocks)
        else:
            for block in blocks:
                self.add(block)
        if self.ntotal == 0:
            raise RetrieveError("no vectors to index")
        return self

    def add(self, x: np.ndarray, ids: np.ndarray | None = None) -> None:
        """Append rows with `ids` (default: continuing from the last id)."""
        block = self._prepare(x)
        start = getattr(self, "next_id_", 0)  # a loaded index is added to with the ids given
        if ids is None:
            ids = np.arange(start, start + len(block), dtype=np.int64)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.index_.add_with_ids(block, ids)
        self.next_id_ = max(start, int(ids.max(initial=-1)) + 1)

    def attach(self, rows: RowSource, ids: np.ndarray | None = None) -> FactoryIndex:
        """Where re-ranking and `reconstruct` read the stored vectors; `ids` is each row's FAISS id
        (default: row i holds id i, as a first build adds them). After a sync updated the index in
        place, ids are the stable ids and answers are turned back into rows."""
        self.rows_ = rows
        self.row_of_ = None
        if ids is not None and not np.array_equal(ids, np.arange(len(ids))):
            row_of = np.full(int(ids.max(initial=-1)) + 2, -1, np.int64)  # the last slot: -1 stays -1
            row_of[ids] = np.arange(len(ids))
            self.row_of_ = row_of
        return self

    def remove(self, ids: np.ndarray) -> int:
        """Remove these FAISS ids (a sync's removed and changed files); how many were found."""
        import faiss

        ids = np.ascontiguousarray(ids, np.int64)
        return int(self.index_.remove_ids(faiss.IDSelectorBatch(ids))) if len(ids) else 0

    # -- reading ------------------------------------------------------------------------------
    def set_params(self, **params: Any) -> FactoryIndex:
        unknown = set(params) - set(PARAMS)
        if unknown:
            raise RetrieveError(f"unknown search parameters {sorted(unknown)}; known: {', '.join(PARAMS)}")
        self.params |= {k: v for k, v in params.items() if v is not None}
        return self

    def _apply_params(self) -> None:
        import faiss

        ivf = _ivf(self.index_)
        if ivf is not None and "nprobe" in self.params:
            ivf.nprobe = int(min(self.params["nprobe"], ivf.nlist))
        if "efSearch" in self.params:
            inner = faiss.downcast_index(self.index_.index) if hasattr(self.index_, "id_map") else self.index_
            if hasattr(inner, "hnsw"):
                inner.hnsw.efSearch = int(self.params["efSearch"])

    def search(self, xq: np.ndarray, k: int, refine: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest ids of each query and their distances (exact ones when `refine`)."""
        if k < 1:
            raise RetrieveError("k must be at least 1")
        xq = self._prepare(xq)
        self._apply_params()
        depth = min(self.ntotal, k * int(self.params.get("rerank", 1))) if refine else k
        dist, ids = self.index_.search(xq, max(depth, k))
        ids = ids.astype(np.int64)
        if getattr(self, "row_of_", None) is not None:
            ids = self.row_of_[np.where((ids >= 0) & (ids < len(self.row_of_)), ids, -1)]
        if refine and getattr(self, "rows_", None) is not None:
            dist, ids = self._rerank(xq, ids)
        elif self.metric == "l2":
            dist = np.sqrt(np.maximum(dist, 0.0))
        else:
            dist = 1.0 - dist
        dist, ids = dist[:, :k].astype(np.float32), ids[:, :k]
        dist[ids < 0] = np.inf
        return dist, ids

    def _rerank(self, xq: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact distances of the candidates, re-sorted; in blocks of queries, so that a batch of
        1,000 queries re-ranking 704 candidates of 512 dims holds ~32 MB of rows, not 1.4 GB."""
        dist = np.full(ids.shape, np.inf, np.float32)
        step = max(1, (1 << 23) // max(1, ids.shape[1] * xq.shape[1]))
        for q0 in range(0, len(ids), step):
            block = ids[q0 : q0 + step]
            valid = block >= 0
            rows = self.reconstruct(np.where(valid, block, 0).ravel()).reshape(*block.shape, -1)
            d = exact_distances(rows, xq[q0 : q0 + step, None, :], self.metric)
            dist[q0 : q0 + step] = np.where(valid, d, np.inf)
        order = np.argsort(dist, axis=1, kind="stable")
        return np.take_along_axis(dist, order, axis=1), np.take_along_axis(ids, order, axis=1)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored rows `ids` (unit length under cosine), read from the shards, not the codes."""
        rows = getattr(self, "rows_", None)
        if rows is None:
            raise RetrieveError("this approximate index has no stored vectors attached to read rows from")
        x = rows.take(np.asarray(ids, dtype=np.int64))
        return normalize_rows(x) if self.metric == "cosine" else np.asarray(x, np.float32)

    def record(self) -> dict[str, Any]:
        """What the manifest records as `search_index` (tuning adds recall and latency)."""
        return {
            "type": "faiss",
            "factory": self.factory,
            "params": dict(self.params),
            "trained_on": int(getattr(self, "trained_on_", 0)),
            **getattr(self, "tuning_", {}),
        }

    def save(self, path: str | os.PathLike) -> None:
        import faiss

        self._apply_params()  # the file opened with FAISS alone searches at the chosen point too
        faiss.write_index(self.index_, str(path))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        metric: str,
        record: dict[str, Any],
        rows: RowSource | None = None,
        writable: bool = False,
    ) -> FactoryIndex:
        """Open memory-mapped: the inverted lists stay on disk until a query touches them (read
        into memory instead when `writable`, for a sync that updates it)."""
        import faiss

        obj = cls(factory=str(record.get("factory", "")), metric=metric, params=record.get("params"))
        flags = 0 if writable else faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
        try:
            obj.index_ = faiss.read_index(str(path), flags)
        except RuntimeError as exc:
            raise RetrieveError(f"cannot read FAISS index {path}: {first_line(exc)}") from None
        obj.d_ = obj.dim
        obj.tuning_ = {
            k: v
            for k, v in record.items()
            if k not in ("type", "factory", "params", "trained_on", "settings")
        }
        obj.trained_on_ = int(record.get("trained_on", 0))
        if rows is not None:
            obj.attach(rows)
        return obj


def _ivf(index: Any):  # -> faiss.IndexIVF | None
    import faiss

    return faiss.try_extract_index_ivf(index)


def seeded_sample(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """At most `n` rows of `x`, chosen with a fixed seed and read in row order (cheap on memmaps)."""
    if len(x) <= n:
        return np.asarray(x, np.float32)
    pick = np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))
    return np.asarray(x[pick], np.float32)


register_kind(
    "faiss",
    lambda path, metric, record, rows=None: FactoryIndex.load(path, metric=metric, record=record, rows=rows),
)
