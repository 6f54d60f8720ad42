"""A sync's approximate index: the previous one updated by stable id, its recall measured again."""

from __future__ import annotations

import os

import numpy as np

from retrieval.config import SearchConfig
from retrieval.index.approx import FactoryIndex
from retrieval.index.base import RowSource
from retrieval.index.tune import Point, ground_truth, query_ids, recall_at, timed
from retrieval.progress import Progress

# Vectors added or removed since the lists and codes were trained, as a fraction of the vectors
# they were built with, past which a sync trains a new index instead. Measured (bench/drift.py,
# 200k x 128, IVF2048,PQ4x4fs at recall@10 0.995): replacing 5% of the vectors with new content
# left recall@10 at 0.970 (trained afresh: 0.980 at the same point), 10% at 0.932, 20% at 0.879;
# k-means lists fitted to other data place new vectors badly. The recall measured after every
# update is the other guard: an update under the goal is thrown away for a full build.
DRIFT = 0.05


def update_search_index(
    previous: str | os.PathLike,
    record: dict,
    rows: RowSource,
    ids: np.ndarray,
    carried: np.ndarray,
    metric: str,
    config: SearchConfig,
    progress: Progress | None = None,
) -> FactoryIndex | None:
    """The previous generation's index with the rows that did not carry over removed and the new
    ones added, by id, at the same operating point, measured again on held-out rows; None where a
    full build is due (drifted past DRIFT, or the recall measured is below the goal).

    `ids` are the new generation's stable ids (row -> id), `carried` marks the rows whose vector
    the previous generation held under the same id (unchanged files).
    """
    progress = progress or Progress()
    index = FactoryIndex.load(previous, metric=metric, record=record, writable=True)
    built = int(record.get("built_with", 0)) or index.ntotal  # older records: what it holds now
    new_rows = np.flatnonzero(~carried)
    # It holds every row of the previous generation: those not carried over are the ones to remove.
    drift = int(record.get("drift", 0)) + index.ntotal - int(carried.sum()) + len(new_rows)
    if drift > DRIFT * built:
        progress.note(
            f"{drift:,} vectors changed since {record.get('factory')} was trained: training a new one"
        )
        return None
    gone = np.setdiff1d(_faiss_ids(index), ids[carried])
    index.remove(gone)
    for start in range(0, len(new_rows), 65536):
        block = new_rows[start : start + 65536]
        index.add(rows.take(block), ids[block])
    index.attach(rows, ids)
    truth = ground_truth(rows, metric, query_ids(len(rows), config.queries, config.seed))
    point = timed(index, truth, Point(dict(index.params), recall_at(index, truth)))
    if point.recall < config.min_recall:
        progress.note(
            f"{record.get('factory')} updated in place measures recall@10 {point.recall:.3f}, under "
            f"{config.min_recall}: training a new one"
        )
        return None
    progress.note(
        f"{record.get('factory')} updated in place (-{len(gone):,} +{len(new_rows):,}): recall@10 "
        f"{point.recall:.3f} on {len(truth.ids):,} held-out rows, p50 {point.p50_ms:.2f} ms"
    )
    index.tuning_ = point.record(len(truth.ids)) | {
        "min_recall": config.min_recall,
        "built_with": built,
        "drift": drift,
    }
    return index


def _faiss_ids(index: FactoryIndex) -> np.ndarray:
    """Every id the FAISS index holds (its IVF lists, or its IDMap)."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index.index_)
    if ivf is None:
        return faiss.vector_to_array(index.index_.id_map).astype(np.int64)
    lists = ivf.invlists
    out = []
    for lst in range(ivf.nlist):
        n = lists.list_size(lst)
        if n:
            out.append(faiss.rev_swig_ptr(lists.get_ids(lst), n).copy())
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)
