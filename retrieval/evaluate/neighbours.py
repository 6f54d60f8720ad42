"""Neighbour search for evaluation, in blocks of queries: the k nearest (exact, or through the index), or the whole ranking for mAP."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.errors import RetrieveError
from retrieval.evaluate.metrics import _ap_from_sorted
from retrieval.index import drop_self

if TYPE_CHECKING:
    from retrieval.index import VectorIndex

# Neighbour ids held at once while searching: bounds memory whatever the number of queries.
_BLOCK_CELLS = 1 << 23


def exact_neighbours(
    db: np.ndarray,
    queries: np.ndarray | None,
    k: int,
    metric: str = "l2",
    searcher: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(distances, ids) of the k nearest database rows of each query, by one batched FAISS search.

    `queries=None` is leave-one-out: every database row queries the others, itself left out (when
    an exact duplicate pushes it out of the k + 1 results, the farthest is dropped instead).
    """
    from retrieval.index import ExactIndex

    index = searcher if searcher is not None else ExactIndex(metric=metric).fit(db)
    k = min(k, len(db) - (1 if queries is None else 0))
    if k < 1:
        raise RetrieveError("Too few images to evaluate: need at least two in the database.")
    if queries is not None:
        return index.search(queries, k)
    dist, ids = index.search(db, k + 1)
    ids, dist = drop_self(ids, dist, np.arange(len(db)), k)
    return dist, ids


def search_in_blocks(
    db: np.ndarray,
    queries: np.ndarray,
    depth: int,
    metric: str,
    leave_one_out: bool,
    searcher: VectorIndex | None = None,
) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """(rows, distances, ids) of the `depth` nearest database rows, block by block of queries (each
    block one batched FAISS search of at most _BLOCK_CELLS ids). `leave_one_out`: `queries` is
    `db` and each row's own entry is left out. `searcher` (an index over `db`, e.g. an approximate
    one) answers as it answers a user's query; without it the search is exact."""
    from retrieval.index import ExactIndex

    # The exact search skips re-ranking: depth reaches the class size (thousands of rows a query),
    # and order among near-ties moves these averages by noise only. An approximate index keeps its
    # own re-ranking: what it returns to a user is what is measured.
    refine = searcher is not None
    searcher = searcher if searcher is not None else ExactIndex(metric=metric).fit(db)
    block = max(1, _BLOCK_CELLS // max(depth + 1, 1))
    for start in range(0, len(queries), block):
        stop = min(start + block, len(queries))
        if leave_one_out:
            dist, ids = searcher.search(queries[start:stop], depth + 1, refine=refine)
            ids, dist = drop_self(ids, dist, np.arange(start, stop), depth)
        else:
            dist, ids = searcher.search(queries[start:stop], depth, refine=refine)
        yield slice(start, stop), dist, ids


def full_average_precision(
    db: np.ndarray,
    db_codes: np.ndarray,
    queries: np.ndarray,
    query_codes: np.ndarray,
    leave_one_out: bool,
    metric: str = "l2",
) -> np.ndarray:
    """Per query AP over the whole database ranking; distances are computed in blocks of one class's
    queries, so the relevant set is shared by the rows of a block (see _ap_from_sorted)."""
    import torch

    from retrieval.index import normalize_rows

    x = normalize_rows(db) if metric == "cosine" else np.asarray(db, np.float32)
    q = normalize_rows(queries) if metric == "cosine" else np.asarray(queries, np.float32)
    x = np.array(x, dtype=np.float32)  # a writable copy: the index's vectors may be a read-only memmap
    xt, x2 = torch.from_numpy(x), torch.from_numpy((x * x).sum(axis=1))
    out = np.zeros(len(q))
    block = max(1, _BLOCK_CELLS // max(len(x), 1))
    for c in np.unique(query_codes):
        rows = np.flatnonzero(query_codes == c)
        relevant = db_codes == c
        rel_idx, non_idx = np.flatnonzero(relevant), np.flatnonzero(~relevant)
        for start in range(0, len(rows), block):
            r = rows[start : start + block]
            qt = torch.from_numpy(q[r])
            # Squared L2 (monotone in L2) or negative cosine similarity: the ranking is what matters.
            d = -(qt @ xt.T) if metric == "cosine" else x2[None, :] - 2 * (qt @ xt.T)
            d = d.numpy()
            rel_d = d[:, rel_idx]
            if leave_one_out:
                # The query is database row r: push it past every relevant item, then drop that column.
                own = np.searchsorted(rel_idx, r)
                rel_d[np.arange(len(r)), own] = np.inf
            rel_d = np.sort(rel_d, axis=1)
            if leave_one_out:
                rel_d = rel_d[:, :-1]
            if rel_d.shape[1] == 0:
                continue
            out[r] = _ap_from_sorted(rel_d, d[:, non_idx], np.ones((len(r), len(non_idx)), bool))
    return out
