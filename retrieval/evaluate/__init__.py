"""Retrieval quality from labels: P@k, R@k, R-precision, MAP@R, mAP and kNN accuracy over exact neighbours.

Modules, lowest first: `metrics` (pure computation on label codes and neighbour ids, with the
definitions), `neighbours` (exact search in blocks), `spaces` (arrays or indexes on disk in, one
`SpaceResult` per space out).
"""

from retrieval.evaluate.metrics import (
    average_precision,
    encode_labels,
    knn_accuracy,
    map_at_r,
    metric_names,
    precision_at_k,
    r_precision,
    recall_at_k,
    recall_vs_exact,
    relevance,
    relevant_counts,
)
from retrieval.evaluate.neighbours import exact_neighbours, full_average_precision
from retrieval.evaluate.spaces import (
    DEFAULT_KS,
    QuerySet,
    SpaceResult,
    best_per_metric,
    check_same_images,
    embed_query_folder,
    evaluate_indexes,
    evaluate_vectors,
    space_name,
)

__all__ = [
    "DEFAULT_KS",
    "QuerySet",
    "SpaceResult",
    "average_precision",
    "best_per_metric",
    "check_same_images",
    "embed_query_folder",
    "encode_labels",
    "evaluate_indexes",
    "evaluate_vectors",
    "exact_neighbours",
    "full_average_precision",
    "knn_accuracy",
    "map_at_r",
    "metric_names",
    "precision_at_k",
    "r_precision",
    "recall_at_k",
    "recall_vs_exact",
    "relevance",
    "relevant_counts",
    "space_name",
]
