"""Retrieval metrics as pure functions over label codes and neighbour ids.

Definitions (q = a query, R = the number of database items that share its label, the query itself
excluded in leave-one-out mode, rel(i) = 1 when the i-th nearest neighbour shares the query's label):

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

import numpy as np


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


def metric_names(ks: Sequence[int], full_map: bool = True) -> list[str]:
    """Column order of a result: P@k..., R@k..., R-precision, MAP@R, mAP, kNN@k..."""
    names = [f"P@{k}" for k in ks] + [f"R@{k}" for k in ks] + ["R-precision", "MAP@R"]
    return names + (["mAP"] if full_map else []) + [f"kNN@{k}" for k in ks]


def ranked_metrics(
    ids: np.ndarray, query_codes: np.ndarray, n_relevant: np.ndarray, db_codes: np.ndarray, ks: Sequence[int]
) -> dict[str, np.ndarray]:
    """Per query P@k, R@k and kNN@k for each k, R-precision and MAP@R, from the neighbour ids of a
    block of queries (deep enough for the largest k and the largest R)."""
    rel = relevance(ids, query_codes, db_codes)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"P@{k}"] = precision_at_k(rel, k)
        out[f"R@{k}"] = recall_at_k(rel, n_relevant, k)
        neighbour_codes = np.where(ids[:, :k] >= 0, db_codes[np.maximum(ids[:, :k], 0)], -1)
        out[f"kNN@{k}"] = knn_accuracy(neighbour_codes, query_codes, k)
    out["R-precision"] = r_precision(rel, n_relevant)
    out["MAP@R"] = map_at_r(rel, n_relevant)
    return out


def count_tied(distances: np.ndarray, k: int) -> int:
    """Queries with exactly equal (finite) distances among their first k + 1 neighbours."""
    top = distances[:, : k + 1]
    return int(((top[:, 1:] == top[:, :-1]) & np.isfinite(top[:, 1:])).any(axis=1).sum())


def mean_over_queries(
    per_query: dict[str, np.ndarray], names: Sequence[str], has_relevant: np.ndarray
) -> dict[str, float]:
    """Each metric's mean: kNN@k over every query, the others over queries with a relevant item."""
    metrics = {}
    for n in names:
        values = per_query[n] if n.startswith("kNN@") else per_query[n][has_relevant]
        metrics[n] = float(values.mean()) if len(values) else float("nan")
    return metrics
