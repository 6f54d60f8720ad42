"""The Searcher: image files, indexed ids or vectors in, one result per query out (hits, or why not).

Every consumer asks it (the CLI's `query`, the Python API's `Index.search`, `eval --queries`,
`neighbours --queries`), so a bad query costs that query only, everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.errors import RetrieveError

if TYPE_CHECKING:
    from retrieval.api import Index


@dataclass(frozen=True)
class Hit:
    """One neighbour."""

    rank: int
    id: int
    distance: float
    path: str  # relative to the index root
    label: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "id": self.id,
            "distance": self.distance,
            "path": self.path,
            "label": self.label,
        }


@dataclass(frozen=True)
class QueryResult:
    """The answer to one query: its hits, or the error that kept it from being answered."""

    query: str  # the query as given: a file path, an id or path in the index, or "vector N"
    hits: list[Hit] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def check_k(k: Any) -> int:
    """`k` as an int of at least 1, or a RetrieveError (2.5, "5" and None are mistakes, not ks)."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise RetrieveError(f"k must be a whole number of at least 1, not {k!r}.")
    return int(k)


class Searcher:
    """Answers queries against one open index; the backbone is loaded on the first file query."""

    def __init__(self, index: Index, device: str = "auto", exact: bool = False) -> None:
        self.index = index
        self.device = device
        self.exact = exact  # brute force over the stored vectors, whatever the search index

    def query(
        self,
        files: Sequence[str | os.PathLike] = (),
        ids: Sequence[str | int] = (),
        vectors: np.ndarray | None = None,
        k: int = 10,
        exclude_self: bool = True,
    ) -> list[QueryResult]:
        """One result per query, in the order files, ids, vectors; a bad one holds its error."""
        k = check_k(k)
        results = self._files(list(files), k) if len(files) else []
        results += self._ids(list(ids), k, exclude_self) if len(ids) else []
        if vectors is not None:
            hits = self.index.search_vectors(vectors, k, exact=self.exact)
            results += [QueryResult(f"vector {i}", h) for i, h in enumerate(hits)]
        return results

    def embed(self, files: Sequence[str | os.PathLike]) -> tuple[np.ndarray, dict[int, str]]:
        """Vectors of the files that could be read, in order, and why each other one could not
        (position in `files` -> message); what `eval --queries` and `neighbours --queries` embed with."""
        failed: dict[int, str] = {}
        vectors = self.index.embed(
            list(files), device=self.device, on_bad=lambda i, exc: failed.__setitem__(i, str(exc))
        )
        return vectors, failed

    def _files(self, files: list[str | os.PathLike], k: int) -> list[QueryResult]:
        vectors, failed = self.embed(files)
        good = [i for i in range(len(files)) if i not in failed]
        answers = (
            dict(zip(good, self.index.search_vectors(vectors, k, exact=self.exact), strict=True))
            if good
            else {}
        )
        return [QueryResult(str(f), answers.get(i), failed.get(i)) for i, f in enumerate(files)]

    def _ids(self, refs: list[str | int], k: int, exclude_self: bool) -> list[QueryResult]:
        known: dict[int, int] = {}  # query position -> its id in the index
        failed: dict[int, str] = {}
        for j, ref in enumerate(refs):
            try:
                known[j] = self.index.id_of(ref)
            except RetrieveError as exc:
                failed[j] = str(exc)
        hits = self.index.search_ids(list(known.values()), k, exclude_self, exact=self.exact) if known else []
        answers = dict(zip(known, hits, strict=True))
        return [QueryResult(str(r), answers.get(j), failed.get(j)) for j, r in enumerate(refs)]

    def search(self, query: Any, k: int = 10) -> list[list[Hit]]:
        """Dispatch, raising on the first bad query: a numpy array = vectors; an int = id; a str/Path
        naming an indexed image (its path relative to the root, or a path to the file under the root)
        = that image, left out of its own results as with ids; any other str/Path = an image file to
        embed. Lists may mix."""
        if isinstance(query, np.ndarray):
            return self.index.search_vectors(query, k, exact=self.exact)
        queries = list(query) if isinstance(query, list | tuple) else [query]
        bad = [q for q in queries if not isinstance(q, int | np.integer | str | os.PathLike)]
        if bad or not queries:
            raise RetrieveError(
                f"search takes vectors, ids, or image paths; got {bad[0]!r}"
                if bad
                else "nothing to search for"
            )
        # One meaning per argument, wherever the caller stands: indexed images are looked up (and
        # left out of their own results), everything else is a file to embed.
        files = [
            i
            for i, q in enumerate(queries)
            if not isinstance(q, int | np.integer) and self.index.indexed(q) is None
        ]
        out: list[list[Hit]] = [[] for _ in queries]
        if files:
            embedded = self.index.embed([queries[i] for i in files], device=self.device)
            for i, hits in zip(files, self.index.search_vectors(embedded, k, exact=self.exact), strict=True):
                out[i] = hits
        as_files = set(files)
        rest = [i for i in range(len(queries)) if i not in as_files]
        if rest:
            for i, hits in zip(
                rest, self.index.search_ids([queries[i] for i in rest], k, exact=self.exact), strict=True
            ):
                out[i] = hits
        return out
