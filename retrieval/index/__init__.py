"""Nearest-neighbour search indexes: the VectorIndex protocol (base) and its members (exact)."""

from retrieval.index.base import METRICS, VectorIndex, check_metric, drop_self, load_index, normalize_rows
from retrieval.index.exact import ExactIndex

__all__ = [
    "METRICS",
    "ExactIndex",
    "VectorIndex",
    "check_metric",
    "drop_self",
    "load_index",
    "normalize_rows",
]
