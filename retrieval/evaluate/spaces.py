"""Whole evaluations of embedding spaces: arrays or indexes on disk in, one `SpaceResult` per space out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.errors import RetrieveError
from retrieval.evaluate.metrics import (
    count_tied,
    encode_labels,
    mean_over_queries,
    metric_names,
    ranked_metrics,
    relevant_counts,
)
from retrieval.evaluate.neighbours import full_average_precision, search_in_blocks

if TYPE_CHECKING:
    from retrieval.api import Index
    from retrieval.index import VectorIndex

DEFAULT_KS = (1, 5, 10)
# Above this many query x database pairs the whole-ranking mAP is skipped unless asked for: it needs
# every distance, not just the nearest ones (50k x 50k takes minutes on 2 cores; MAP@R does not).
FULL_MAP_MAX_PAIRS = 400_000_000


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


def _checked_ks(ks: Sequence[int]) -> list[int]:
    out = sorted({int(k) for k in ks})
    if not out or out[0] < 1:
        raise RetrieveError("k values must be positive integers.")
    return out


def _query_side(
    db: np.ndarray,
    db_labels: Sequence[str],
    queries: np.ndarray | None,
    query_labels: Sequence[str] | None,
) -> tuple[np.ndarray, Sequence[str]]:
    """The query vectors and labels: the database itself when `queries` is None (leave-one-out)."""
    if len(db) != len(db_labels):
        raise ValueError("one label per database vector")
    if queries is None:
        if len(db) < 2:
            raise RetrieveError(
                f"Leave-one-out evaluation needs at least 2 images; the index holds {len(db)}. "
                "Index more images, or give a labelled query folder («queries»)."
            )
        return db, db_labels
    q_vecs = np.ascontiguousarray(queries, dtype=np.float32)
    if query_labels is None or len(q_vecs) != len(query_labels):
        raise ValueError("one label per query vector")
    if q_vecs.shape[1] != db.shape[1]:
        raise RetrieveError(f"queries have {q_vecs.shape[1]} dimensions, the database {db.shape[1]}.")
    return q_vecs, query_labels


def _ranked_per_query(
    db: np.ndarray,
    db_codes: np.ndarray,
    q_vecs: np.ndarray,
    q_codes: np.ndarray,
    n_rel: np.ndarray,
    ks: list[int],
    metric: str,
    loo: bool,
    names: Sequence[str],
    searcher: VectorIndex | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """Every metric but mAP per query, from neighbours deep enough for the largest k and the largest
    R, and the number of queries with exactly tied distances among their first ks[-1] + 1."""
    limit = len(db) - (1 if loo else 0)
    depth = min(max(ks[-1], int(n_rel.max(initial=0))), limit)

    def ranked_at(depth: int) -> tuple[dict[str, np.ndarray], int]:
        """Per query metrics from neighbours `depth` deep (those beyond it count as misses)."""
        per_query: dict[str, np.ndarray] = {n: np.zeros(len(q_vecs)) for n in names}
        tied = 0
        for rows, dist, ids in search_in_blocks(db, q_vecs, depth, metric, loo, searcher):
            tied += count_tied(dist, ks[-1])
            for n, values in ranked_metrics(ids, q_codes[rows], n_rel[rows], db_codes, ks).items():
                per_query[n][rows] = values
        return per_query, tied

    per_query, tied = ranked_at(depth)
    if searcher is not None and depth > min(ks[-1], limit):
        # An approximate index re-ranks a candidate pool that grows with the depth asked for: the
        # cut-off metrics come from a search as deep as the largest k, as a user's query gets them.
        at_k, tied = ranked_at(min(ks[-1], limit))
        per_query |= {n: v for n, v in at_k.items() if n.startswith(("P@", "R@", "kNN@"))}
    return per_query, tied


def _input_notes(db_labels: Sequence[str], n_queries: int, n_db: int, full_map: bool) -> list[str]:
    notes: list[str] = []
    if len(set(db_labels)) == 1:
        notes.append(
            f"every indexed image has the same label ({db_labels[0]!r}), so every neighbour counts as "
            "relevant and the scores say nothing; labels come from folders (root/<class>/image.jpg)"
        )
    if not full_map and n_queries * n_db > FULL_MAP_MAX_PAIRS:
        notes.append(
            f"mAP over the whole ranking skipped ({n_queries:,} x {n_db:,} pairs); "
            "MAP@R is the cheaper summary (pass full_map=True / --full-map to compute it)"
        )
    return notes


def _result_notes(
    tied: int, n_queries: int, k: int, has_relevant: np.ndarray, q_codes: np.ndarray, vocab: list[str]
) -> list[str]:
    notes: list[str] = []
    if tied > n_queries // 100:
        notes.append(
            f"{tied} of {n_queries} queries have exactly tied distances among their nearest "
            f"{k + 1} (duplicate images?): P@k, R@k, R-precision, MAP@R and kNN@k take the index's "
            "order among ties (path order), which can flatter a space; mAP averages over every order"
        )
    if not has_relevant.all():
        missing = sorted({vocab[c] for c in q_codes[~has_relevant]})
        notes.append(
            f"{int((~has_relevant).sum())} queries have no relevant item in the database "
            f"(labels {', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}): left out of the "
            "retrieval metrics, counted wrong in kNN accuracy"
        )
    return notes


def evaluate_vectors(
    db: np.ndarray,
    db_labels: Sequence[str],
    queries: np.ndarray | None = None,
    query_labels: Sequence[str] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    metric: str = "l2",
    full_map: bool | None = None,
    name: str = "",
    searcher: VectorIndex | None = None,
) -> SpaceResult:
    """Every metric for one space: leave-one-out over `db` when `queries` is None, else queries vs db.

    Neighbours come from exact FAISS search in blocks of queries (each block one batched call), deep
    enough for the largest k and the largest R; or from `searcher`, an index over `db` (an
    approximate one measures the space as that index answers). The whole-ranking mAP is exact
    either way; `full_map=None` computes it only up to FULL_MAP_MAX_PAIRS query x database pairs.
    """
    ks = _checked_ks(ks)
    db = np.ascontiguousarray(db, dtype=np.float32)
    q_vecs, q_labels = _query_side(db, db_labels, queries, query_labels)
    loo = queries is None
    (db_codes, q_codes), vocab = encode_labels(db_labels, q_labels)
    n_rel = relevant_counts(q_codes, db_codes, loo)
    if full_map is None:
        full_map = len(q_vecs) * len(db) <= FULL_MAP_MAX_PAIRS
    notes = _input_notes(db_labels, len(q_vecs), len(db), full_map)
    names = metric_names(ks, full_map)
    per_query, tied = _ranked_per_query(
        db, db_codes, q_vecs, q_codes, n_rel, ks, metric, loo, names, searcher
    )
    if full_map:
        per_query["mAP"] = full_average_precision(db, db_codes, q_vecs, q_codes, loo, metric)
    has_relevant = n_rel > 0
    notes += _result_notes(tied, len(q_vecs), ks[-1], has_relevant, q_codes, vocab)
    return SpaceResult(
        name=name,
        mode="leave-one-out" if loo else "queries",
        n_database=len(db),
        n_queries=int(has_relevant.sum()),
        n_queries_total=len(q_vecs),
        metrics=mean_over_queries(per_query, names, has_relevant),
        notes=tuple(notes),
    )


@dataclass(frozen=True)
class QuerySet:
    """Query images already embedded in one space."""

    vectors: np.ndarray
    labels: list[str]
    paths: list[str]
    # Query files that could not be used, as (path relative to the folder, reason): a bad query
    # costs that query only.
    skipped: list[tuple[str, str]] = field(default_factory=list)


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
    """Scan `folder` (label = parent folder) and embed its images with `index`'s backbone.

    A file that cannot be read is left out and listed in `skipped` with its reason; only a folder
    with no usable image at all is an error.
    """
    from retrieval.errors import EmptyInputError
    from retrieval.images import scan
    from retrieval.query import Searcher

    entries, problems = scan(folder)
    skipped = list(problems)
    bad: dict[int, str] = {}
    if entries:
        vectors, bad = Searcher(index, device=device).embed([e.path for e in entries])
    good = [e for i, e in enumerate(entries) if i not in bad]
    # The embedder's message starts with the file's path: the ledger keeps the reason alone.
    skipped += [
        (entries[i].relpath, why.removeprefix(f"{entries[i].path}: ")) for i, why in sorted(bad.items())
    ]
    if not good:
        why = f" ({len(skipped)} unreadable: {skipped[0][0]}: {skipped[0][1]}, ...)" if skipped else ""
        raise EmptyInputError(f"No query images found in {folder}{why}.")
    return QuerySet(vectors, [e.label for e in good], [e.relpath for e in good], skipped)


def evaluate_indexes(
    indexes: Sequence[Index],
    queries: Sequence[QuerySet] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    full_map: bool | None = None,
    exact: bool = False,
) -> list[SpaceResult]:
    """One SpaceResult per index: leave-one-out, or `queries[i]` (embedded in space i) against index i.

    Neighbours come through each index's own search (an approximate index is measured as it answers
    a query); `exact` searches the stored vectors exhaustively instead, which measures the space.
    """
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
        kind = index.manifest.search_index.get("type", "exact")
        approximate = not exact and kind != "exact"
        result = evaluate_vectors(
            np.asarray(index.vectors(), dtype=np.float32),
            index.labels,
            None if q is None else q.vectors,
            None if q is None else q.labels,
            ks=ks,
            metric=index.metric,
            full_map=full_map,
            name=space_name(index),
            searcher=index.vector_index if approximate else None,
        )
        if approximate:
            search = index.manifest.search_index
            result = replace(
                result,
                notes=(
                    *result.notes,
                    f"neighbours from the approximate index {search.get('factory')} "
                    f"(recall@10 {search.get('recall_at_10')}), as a query gets them; "
                    "«exact» measures the space itself",
                ),
            )
        info = {
            "index": str(index.path),
            "backbone": index.manifest.backbone,
            "weights": index.manifest.weights.id,
            "dim": index.dim,
            "metric": index.metric,
            "search": index.manifest.search_index.get("factory", "exact") if approximate else "exact",
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
