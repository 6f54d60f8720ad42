"""Retrieval quality from labels: P@k, R@k, R-precision, MAP@R, mAP and kNN accuracy over exact neighbours.

The first half is pure computation on arrays (label codes, neighbour ids); the second half turns
indexes on disk into those arrays. Definitions (q = a query, R = the number of database items that
share its label, the query itself excluded in leave-one-out mode, rel(i) = 1 when the i-th nearest
neighbour shares the query's label):

- precision@k   = sum_{i<=k} rel(i) / k
- recall@k      = sum_{i<=k} rel(i) / R  (the IR definition; the metric-learning "Recall@1" is kNN@1)
- R-precision   = sum_{i<=R} rel(i) / R
- MAP@R         = 1/R sum_{i<=R} P(i) rel(i)   (Musgrave et al., "A Metric Learning Reality Check", 2020)
- mAP           = mean over queries of 1/R sum over all relevant items of P(rank of the item), over the
                  whole ranking of the database
- kNN@k         = the majority label of the k nearest neighbours equals the query's label (a tie goes
                  to the tied label met first, i.e. the nearest)

Retrieval metrics average over queries with R >= 1 (a query whose label is absent from the database
cannot retrieve anything); kNN accuracy averages over all queries, counting those as wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.errors import RetrieveError
from retrieval.index import drop_self

if TYPE_CHECKING:
    from retrieval.api import Index

DEFAULT_KS = (1, 5, 10)
# Neighbour ids held at once while searching: bounds memory whatever the number of queries.
_BLOCK_CELLS = 1 << 23
# Above this many query x database pairs the whole-ranking mAP is skipped unless asked for: it needs
# every distance, not just the nearest ones (50k x 50k takes minutes on 2 cores; MAP@R does not).
FULL_MAP_MAX_PAIRS = 400_000_000


# --------------------------------------------------------------------------------------------
# Pure metrics over arrays


def encode_labels(*label_lists: Sequence[str]) -> tuple[list[np.ndarray], list[str]]:
    """Integer codes for several label lists over one shared vocabulary (sorted)."""
    vocab = sorted(set().union(*[set(labels) for labels in label_lists]))
    lookup = {name: i for i, name in enumerate(vocab)}
    return [np.fromiter((lookup[s] for s in labels), np.int64, len(labels)) for labels in label_lists], vocab


def relevant_counts(query_codes: np.ndarray, db_codes: np.ndarray, leave_one_out: bool) -> np.ndarray:
    """R per query: database items with the query's label (less the query itself when leave-one-out)."""
    n_classes = int(max(query_codes.max(initial=-1), db_codes.max(initial=-1))) + 1
    counts = np.bincount(db_codes, minlength=n_classes)
    return counts[query_codes] - (1 if leave_one_out else 0)


def relevance(neighbour_ids: np.ndarray, query_codes: np.ndarray, db_codes: np.ndarray) -> np.ndarray:
    """rel[q, i]: whether the i-th neighbour of q shares q's label (missing neighbours, id -1, do not)."""
    ids = np.asarray(neighbour_ids)
    labels = db_codes[np.where(ids >= 0, ids, 0)]
    return (labels == query_codes[:, None]) & (ids >= 0)


def precision_at_k(rel: np.ndarray, k: int) -> np.ndarray:
    """Per query: the share of the k nearest that are relevant (missing neighbours count as wrong)."""
    return rel[:, :k].sum(axis=1) / float(k)


def recall_at_k(rel: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Per query: the share of its R relevant items found among the k nearest."""
    return rel[:, :k].sum(axis=1) / np.maximum(n_relevant, 1)


def r_precision(rel: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """Per query: precision at R; `rel` must hold at least max(R) columns."""
    _check_depth(rel, n_relevant)
    within = np.arange(rel.shape[1])[None, :] < n_relevant[:, None]
    return (rel & within).sum(axis=1) / np.maximum(n_relevant, 1)


def map_at_r(rel: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """Per query: MAP@R (Musgrave et al. 2020), 1/R sum_{i<=R} P(i) rel(i); `rel` holds >= max(R) columns."""
    _check_depth(rel, n_relevant)
    ranks = np.arange(1, rel.shape[1] + 1)
    precision = np.cumsum(rel, axis=1) / ranks
    within = ranks[None, :] <= n_relevant[:, None]
    return (precision * (rel & within)).sum(axis=1) / np.maximum(n_relevant, 1)


def average_precision(rel: np.ndarray, n_relevant: np.ndarray | None = None) -> np.ndarray:
    """Per query: AP of a complete ranking (each row holds every database item, nearest first)."""
    n_rel = rel.sum(axis=1) if n_relevant is None else n_relevant
    ranks = np.arange(1, rel.shape[1] + 1)
    precision = np.cumsum(rel, axis=1) / ranks
    return (precision * rel).sum(axis=1) / np.maximum(n_rel, 1)


def _ap_from_sorted(rel_d: np.ndarray, sub: np.ndarray, non: np.ndarray) -> np.ndarray:
    """Per row AP over a whole ranking without sorting it (relevant distances `rel_d` sorted per row;
    `non` masks the non-relevant items in `sub`).

    Without ties the m-th relevant item (0-based) is at rank m + 1 + the number of non-relevant items
    closer. Tied distances have no order, so AP is its expectation over every order of each tie
    group (McSherry & Najork 2008): ties never flatter a space, and an embedding that maps every
    image to one point scores chance, not 1.0. For a group of t tied items, r of them relevant, with
    p items and q relevant ones ahead of it, the expected sum of precisions at its relevant items is

        (r/t) * sum_{j=1..t} (q + 1 + (j-1)(r-1)/(t-1)) / (p + j)
          = (r/t) * (b t + (q + 1 - b(p + 1)) (H(p+t) - H(p))),   b = (r-1)/(t-1)  (0 when t = 1),

    with H the harmonic numbers; untied, it is the usual (q + 1) / (p + 1).
    """
    import torch

    n, r = rel_d.shape
    boundaries = torch.from_numpy(np.ascontiguousarray(rel_d, dtype=np.float32))
    values = torch.from_numpy(np.ascontiguousarray(np.where(non, sub, np.inf), dtype=np.float32))
    # right: how many relevant items are at or before each non-relevant one; left: strictly before.
    right = torch.searchsorted(boundaries, values, right=True)
    left = torch.searchsorted(boundaries, values, right=False)
    counts = torch.zeros(n, r + 1, dtype=torch.int64)
    counts.scatter_add_(1, right, torch.ones_like(right))
    less = torch.cumsum(counts[:, :r], dim=1).numpy()  # non-relevant strictly closer than the m-th relevant
    tied = (right > left) & torch.from_numpy(np.ascontiguousarray(non))
    # A non-relevant item tied with relevant ones belongs to the group that starts at index `left`.
    eq = torch.zeros(n, r + 1, dtype=torch.int64)
    eq.scatter_add_(1, torch.where(tied, left, r), tied.long())
    eq = eq[:, :r].numpy()
    # Tie groups among the relevant distances: starts, and each group's size.
    idx = np.broadcast_to(np.arange(r), (n, r))
    starts = np.ones((n, r), bool)
    starts[:, 1:] = rel_d[:, 1:] != rel_d[:, :-1]
    next_start = np.full((n, r), r)
    if r > 1:
        following = np.where(starts, idx, r)[:, 1:]
        next_start[:, :-1] = np.minimum.accumulate(following[:, ::-1], axis=1)[:, ::-1]
    size = next_start - idx  # relevant items in the group starting here
    t = size + eq  # all items in that group
    p = idx + less  # items ahead of it
    b = np.where(t > 1, (size - 1) / np.maximum(t - 1, 1), 0.0)
    total = int(p.max(initial=0) + t.max(initial=0))
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, total + 1))])
    group = (size / t) * (b * t + (idx + 1 - b * (p + 1)) * (harmonic[p + t] - harmonic[p]))
    return np.where(starts, group, 0.0).sum(axis=1) / r


def knn_accuracy(neighbour_codes: np.ndarray, query_codes: np.ndarray, k: int) -> np.ndarray:
    """Per query: 1.0 when the majority label of its k nearest equals its own (ties: nearest tied label).

    `neighbour_codes` holds labels of neighbours (-1 for missing ones, which never vote).
    """
    lab = neighbour_codes[:, :k]
    votes = (lab[:, :, None] == lab[:, None, :]).sum(axis=2)
    votes[lab < 0] = 0
    winner = np.argmax(votes, axis=1)  # the first position with the most votes: nearest among ties
    pred = lab[np.arange(len(lab)), winner]
    return (pred == query_codes).astype(np.float64)


def recall_vs_exact(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Recall@k of an approximate index: the mean share of the exact k nearest that it also returns."""
    a, e = np.asarray(approx_ids)[:, :k], np.asarray(exact_ids)[:, :k]
    found = (a[:, :, None] == e[:, None, :]) & (e[:, None, :] >= 0)
    return float(found.any(axis=1).sum() / max(1, (e >= 0).sum()))


def _check_depth(rel: np.ndarray, n_relevant: np.ndarray) -> None:
    if len(n_relevant) and rel.shape[1] < int(n_relevant.max()):
        raise ValueError(
            f"need {int(n_relevant.max())} neighbours per query for R-based metrics, got {rel.shape[1]}"
        )


# --------------------------------------------------------------------------------------------
# Exact search and the whole evaluation of one space


def metric_names(ks: Sequence[int], full_map: bool = True) -> list[str]:
    """Column order of a result: P@k..., R@k..., R-precision, MAP@R, mAP, kNN@k..."""
    names = [f"P@{k}" for k in ks] + [f"R@{k}" for k in ks] + ["R-precision", "MAP@R"]
    return names + (["mAP"] if full_map else []) + [f"kNN@{k}" for k in ks]


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


@dataclass(frozen=True)
class SpaceResult:
    """The metrics of one embedding space over one query set."""

    name: str
    mode: str  # "leave-one-out" or "queries"
    n_database: int
    n_queries: int  # queries with at least one relevant item (the retrieval metrics' denominator)
    n_queries_total: int
    metrics: dict[str, float]  # name -> mean over queries, in `metric_names` order
    notes: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "space": self.name,
            "mode": self.mode,
            "database": self.n_database,
            "queries": self.n_queries,
            "queries_total": self.n_queries_total,
            "metrics": dict(self.metrics),
            "notes": list(self.notes),
            **self.extra,
        }


def evaluate_vectors(
    db: np.ndarray,
    db_labels: Sequence[str],
    queries: np.ndarray | None = None,
    query_labels: Sequence[str] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    metric: str = "l2",
    full_map: bool | None = None,
    name: str = "",
) -> SpaceResult:
    """Every metric for one space: leave-one-out over `db` when `queries` is None, else queries vs db.

    Neighbours come from exact FAISS search in blocks of queries (each block one batched call), deep
    enough for the largest k and the largest R. `full_map=None` computes the whole-ranking mAP only
    up to FULL_MAP_MAX_PAIRS query x database pairs.
    """
    from retrieval.index import ExactIndex

    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise RetrieveError("k values must be positive integers.")
    db = np.ascontiguousarray(db, dtype=np.float32)
    if len(db) != len(db_labels):
        raise ValueError("one label per database vector")
    loo = queries is None
    if loo and len(db) < 2:
        raise RetrieveError(
            f"Leave-one-out evaluation needs at least 2 images; the index holds {len(db)}. "
            "Index more images, or give a labelled query folder (--queries)."
        )
    if loo:
        q_vecs, q_labels = db, db_labels
    else:
        q_vecs = np.ascontiguousarray(queries, dtype=np.float32)
        if query_labels is None or len(q_vecs) != len(query_labels):
            raise ValueError("one label per query vector")
        q_labels = query_labels
        if q_vecs.shape[1] != db.shape[1]:
            raise RetrieveError(f"queries have {q_vecs.shape[1]} dimensions, the database {db.shape[1]}.")
    (db_codes, q_codes), vocab = encode_labels(db_labels, q_labels)
    n_rel = relevant_counts(q_codes, db_codes, loo)
    pairs = len(q_vecs) * len(db)
    notes: list[str] = []
    if len(set(db_labels)) == 1:
        notes.append(
            f"every indexed image has the same label ({db_labels[0]!r}), so every neighbour counts as "
            "relevant and the scores say nothing; labels come from folders (root/<class>/image.jpg)"
        )
    if full_map is None:
        full_map = pairs <= FULL_MAP_MAX_PAIRS
    if not full_map and pairs > FULL_MAP_MAX_PAIRS:
        notes.append(
            f"mAP over the whole ranking skipped ({len(q_vecs):,} x {len(db):,} pairs); "
            "MAP@R is the cheaper summary (pass full_map=True / --full-map to compute it)"
        )
    names = metric_names(ks, full_map)
    per_query: dict[str, np.ndarray] = {n: np.zeros(len(q_vecs)) for n in names}

    searcher = ExactIndex(metric=metric).fit(db)
    depth = min(max(ks[-1], int(n_rel.max(initial=0))), len(db) - (1 if loo else 0))
    block = max(1, _BLOCK_CELLS // max(depth + 1, 1))
    tied = 0  # queries with exactly equal distances among their first ks[-1] + 1 neighbours
    for start in range(0, len(q_vecs), block):
        stop = min(start + block, len(q_vecs))
        # No exact re-ranking: depth reaches the class size (thousands of rows a query), and order
        # among near-ties moves these averages by noise only.
        if loo:
            dist, ids = searcher.search(q_vecs[start:stop], depth + 1, refine=False)
            ids, dist = drop_self(ids, dist, np.arange(start, stop), depth)
        else:
            dist, ids = searcher.search(q_vecs[start:stop], depth, refine=False)
        top = dist[:, : ks[-1] + 1]
        tied += int(((top[:, 1:] == top[:, :-1]) & np.isfinite(top[:, 1:])).any(axis=1).sum())
        qc, nr = q_codes[start:stop], n_rel[start:stop]
        rel = relevance(ids, qc, db_codes)
        for k in ks:
            per_query[f"P@{k}"][start:stop] = precision_at_k(rel, k)
            per_query[f"R@{k}"][start:stop] = recall_at_k(rel, nr, k)
            neighbour_codes = np.where(ids[:, :k] >= 0, db_codes[np.maximum(ids[:, :k], 0)], -1)
            per_query[f"kNN@{k}"][start:stop] = knn_accuracy(neighbour_codes, qc, k)
        per_query["R-precision"][start:stop] = r_precision(rel, nr)
        per_query["MAP@R"][start:stop] = map_at_r(rel, nr)
    if full_map:
        per_query["mAP"] = full_average_precision(db, db_codes, q_vecs, q_codes, loo, metric)

    if tied > len(q_vecs) // 100:
        notes.append(
            f"{tied} of {len(q_vecs)} queries have exactly tied distances among their nearest "
            f"{ks[-1] + 1} (duplicate images?): P@k, R@k, R-precision, MAP@R and kNN@k take the index's "
            "order among ties (path order), which can flatter a space; mAP averages over every order"
        )
    has_relevant = n_rel > 0
    if not has_relevant.all():
        missing = sorted({vocab[c] for c in q_codes[~has_relevant]})
        notes.append(
            f"{int((~has_relevant).sum())} queries have no relevant item in the database "
            f"(labels {', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}): left out of the "
            "retrieval metrics, counted wrong in kNN accuracy"
        )
    metrics = {}
    for n in names:
        values = per_query[n] if n.startswith("kNN@") else per_query[n][has_relevant]
        metrics[n] = float(values.mean()) if len(values) else float("nan")
    return SpaceResult(
        name=name,
        mode="leave-one-out" if loo else "queries",
        n_database=len(db),
        n_queries=int(has_relevant.sum()),
        n_queries_total=len(q_vecs),
        metrics=metrics,
        notes=tuple(notes),
    )


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


# --------------------------------------------------------------------------------------------
# Spaces on disk


@dataclass(frozen=True)
class QuerySet:
    """Query images already embedded in one space."""

    vectors: np.ndarray
    labels: list[str]
    paths: list[str]


def space_name(index: Index) -> str:
    """A short name for a space: the index folder's name."""
    return index.path.name


def check_same_images(indexes: Sequence[Index]) -> None:
    """Spaces compared side by side must hold the same images (path relative to the root + label)."""
    if len(indexes) < 2:
        return
    first = indexes[0]
    ref = set(zip(first.paths, first.labels, strict=True))
    for other in indexes[1:]:
        got = set(zip(other.paths, other.labels, strict=True))
        if got == ref:
            continue
        only_first = sorted(p for p, _ in ref - got)
        only_other = sorted(p for p, _ in got - ref)

        def some(paths: list[str]) -> str:
            return ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")

        parts = []
        if only_first:
            parts.append(f"{len(only_first)} only in {first.path} ({some(only_first)})")
        if only_other:
            parts.append(f"{len(only_other)} only in {other.path} ({some(only_other)})")
        raise RetrieveError(
            "The spaces do not cover the same images, so their numbers would not be comparable: "
            + "; ".join(parts)
            + ". Index the same folder with each backbone."
        )


def embed_query_folder(index: Index, folder: str | Path, device: str = "auto") -> QuerySet:
    """Scan `folder` (label = parent folder) and embed its images with `index`'s backbone."""
    from retrieval.errors import EmptyInputError
    from retrieval.images import scan

    entries, _ = scan(folder)
    if not entries:
        raise EmptyInputError(f"No query images found in {folder}.")
    vectors = index.embed([e.path for e in entries], device=device)
    return QuerySet(vectors, [e.label for e in entries], [e.relpath for e in entries])


def evaluate_indexes(
    indexes: Sequence[Index],
    queries: Sequence[QuerySet] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    full_map: bool | None = None,
) -> list[SpaceResult]:
    """One SpaceResult per index: leave-one-out, or `queries[i]` (embedded in space i) against index i."""
    if not indexes:
        raise RetrieveError("No index to evaluate.")
    check_same_images(indexes)
    if queries is not None and len(queries) != len(indexes):
        raise ValueError("one query set per index")
    n = len(indexes[0]) * (len(queries[0].vectors) if queries else len(indexes[0]))
    if full_map is None:
        # One decision for every space, so the table's columns match.
        full_map = n <= FULL_MAP_MAX_PAIRS
    results = []
    for i, index in enumerate(indexes):
        q = queries[i] if queries is not None else None
        result = evaluate_vectors(
            np.asarray(index.vectors(), dtype=np.float32),
            index.labels,
            None if q is None else q.vectors,
            None if q is None else q.labels,
            ks=ks,
            metric=index.metric,
            full_map=full_map,
            name=space_name(index),
        )
        info = {
            "index": str(index.path),
            "backbone": index.manifest.backbone,
            "weights": index.manifest.weights.id,
            "dim": index.dim,
            "metric": index.metric,
        }
        results.append(replace(result, extra=info))
    return results


def best_per_metric(results: Sequence[SpaceResult]) -> dict[str, list[int]]:
    """For each metric, the rows holding the highest value (all of them on a tie); every metric is
    higher-is-better."""
    best: dict[str, list[int]] = {}
    if not results:
        return best
    for name in results[0].metrics:
        values = np.array([r.metrics.get(name, np.nan) for r in results], dtype=float)
        if np.isnan(values).all():
            best[name] = []
            continue
        top = np.nanmax(values)
        best[name] = [i for i, v in enumerate(values) if np.isclose(v, top, rtol=0, atol=1e-12)]
    return best
