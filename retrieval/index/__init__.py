"""Nearest-neighbour search: the VectorIndex protocol, exact and approximate kinds, the measured choice."""

from retrieval.index.approx import FactoryIndex
from retrieval.index.base import (
    METRICS,
    ArrayRows,
    RowSource,
    VectorIndex,
    check_metric,
    checked,
    drop_self,
    load_index,
    normalize_rows,
)
from retrieval.index.choose import build_search_index
from retrieval.index.exact import ExactIndex, brute_force
from retrieval.index.update import update_search_index

__all__ = [
    "METRICS",
    "ArrayRows",
    "ExactIndex",
    "FactoryIndex",
    "RowSource",
    "VectorIndex",
    "brute_force",
    "build_search_index",
    "check_metric",
    "checked",
    "drop_self",
    "load_index",
    "normalize_rows",
    "update_search_index",
]
