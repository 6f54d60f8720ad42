"""`--search auto`: the cheapest index whose measured recall@10 meets the goal within the memory budget."""

from __future__ import annotations

import numpy as np

from retrieval.config import SearchConfig
from retrieval.errors import RetrieveError
from retrieval.index.approx import FactoryIndex
from retrieval.index.base import RowSource, VectorIndex
from retrieval.index.exact import ExactIndex
from retrieval.index.factory import (
    FLAT_BELOW,
    ID_BYTES,
    Candidate,
    candidates,
    default_max_memory,
    estimate_bytes,
)
from retrieval.index.tune import Point, Truth, ground_truth, latency, operating_point, query_ids, sweep
from retrieval.progress import Progress
from retrieval.text import format_size

# FAISS's advice is 30-256 training points per list; fewer than 30k train poorly whatever the lists.
TRAIN_MIN, TRAIN_MAX, TRAIN_PER_LIST = 30_000, 256_000, 64
KMEANS_ITER = 10  # 10 Lloyd rounds: most of the gain of FAISS's 25 at 40% of the time (1M x 512)


def build_search_index(
    rows: RowSource,
    metric: str,
    config: SearchConfig,
    progress: Progress | None = None,
    ids: np.ndarray | None = None,
) -> VectorIndex:
    """Fit the search index `config` asks for over `rows`, measured and with its operating point set.

    `rows` are read block by block (memory-mapped shards): the build holds the index being
    measured, one training sample and one block, never every vector at once. An approximate index
    holds `ids` (each row's stable id; default: the rows), which a later sync removes and adds by.
    """
    progress = progress or Progress()
    n = len(rows)
    if n == 0:
        raise RetrieveError("no vectors to index")
    d = rows.take(np.zeros(1, np.int64)).shape[1]
    budget = config.max_memory or default_max_memory()
    if n * ID_BYTES > budget:
        raise RetrieveError(
            f"a memory budget of {format_size(budget)} is smaller than the ids of {n:,} vectors alone "
            f"({format_size(n * ID_BYTES)}); raise «max_memory»."
        )
    mode = config.search.strip()
    exact_bytes = 4 * n * d
    if mode.lower() == "exact" or (mode.lower() == "auto" and n < FLAT_BELOW and exact_bytes <= budget):
        return _exact(rows, metric)
    if mode.lower() in ("auto", "approximate"):
        pool = candidates(n, d)
    else:
        pool = [Candidate(mode, estimate_bytes(mode, n, d) or 0, lossy=not mode.endswith(",Flat"))]
    fits = [c for c in pool if c.bytes <= budget]
    if not fits:
        cheapest = min(pool, key=lambda c: c.bytes)
        raise RetrieveError(
            f"no search index for {n:,} x {d} vectors fits in {format_size(budget)}: the smallest, "
            f"{cheapest.factory}, needs about {format_size(cheapest.bytes)}; raise «max_memory» to that."
        )
    truth, sample = _measuring_set(rows, metric, config, fits)
    progress.note(
        f"measuring recall@10 on {len(truth.ids):,} held-out rows; training on {len(sample):,} vectors"
    )
    centroids: dict[int, np.ndarray] = {}
    tried: list[tuple[Candidate, Point]] = []
    for cand in fits:
        index = _fit(cand, rows, metric, sample, centroids, config.seed, progress, ids)
        points = sweep(index, rows, truth, lossy=cand.lossy)
        best, ok = operating_point(index, points, truth, config.min_recall, config.max_latency_ms)
        progress.note(
            f"{cand.factory}: recall@10 {best.recall:.3f} at {_params(best)}, p50 {best.p50_ms:.2f} ms, "
            f"~{format_size(cand.bytes)}"
        )
        if ok or mode.lower() not in ("auto", "approximate"):
            index.tuning_ = best.record(len(truth.ids)) | {"min_recall": config.min_recall, "built_with": n}
            if not ok:
                progress.warn(
                    f"{cand.factory} reaches recall@10 {best.recall:.3f} at best, below the "
                    f"{config.min_recall} asked for; it is kept because it was named."
                )
            return index
        tried.append((cand, best))
        del index
    raise RetrieveError(_unmet(tried, pool, budget, config))


def _params(point: Point) -> str:
    return ", ".join(f"{k} {v}" for k, v in point.params.items())


def _unmet(
    tried: list[tuple[Candidate, Point]], pool: list[Candidate], budget: int, config: SearchConfig
) -> str:
    """What the budget allows instead: the best recall measured in it, and the next size up."""
    cand, best = max(tried, key=lambda t: t[1].recall)
    bigger = [c for c in pool if c.bytes > budget]
    more = (
        f"; the next larger index, {bigger[0].factory}, needs about {format_size(bigger[0].bytes)} "
        f"(raise «max_memory» to try it)"
        if bigger
        else ""
    )
    if best.recall >= config.min_recall:  # the recall is there; a single query is too slow
        advice = (
            f"it reaches the recall but answers in {best.p50_ms:.2f} ms (p50): raise «max_latency_ms» "
            f"to {np.ceil(best.p50_ms * 10) / 10:g} to accept it"
        )
    else:
        advice = f"Lower «min_recall» to {np.floor(best.recall * 100) / 100:.2f} to accept it"
    return (
        f"no index within {format_size(budget)} reaches recall@10 {config.min_recall} under "
        f"{config.max_latency_ms:g} ms: the best measured there is {cand.factory} at recall@10 "
        f"{best.recall:.3f} ({_params(best)}, p50 {best.p50_ms:.2f} ms). {advice}{more}."
    )


def _exact(rows: RowSource, metric: str) -> ExactIndex:
    index = ExactIndex(metric=metric).fit(rows.blocks())
    ids = query_ids(len(rows), 200)
    p50, p95 = latency(index, rows.take(ids), k=min(10, len(rows)))
    index.tuning_ = {"recall_at_10": 1.0, "p50_ms": round(p50, 3), "p95_ms": round(p95, 3)}
    return index


def _measuring_set(
    rows: RowSource, metric: str, config: SearchConfig, fits: list[Candidate]
) -> tuple[Truth, np.ndarray]:
    """Held-out query rows with their exact neighbours, and a training sample of the other rows."""
    n = len(rows)
    ids = query_ids(n, config.queries, config.seed)
    lists = max((c.nlist or 0) for c in fits)
    size = int(np.clip(TRAIN_PER_LIST * lists, TRAIN_MIN, TRAIN_MAX))
    rest = np.setdiff1d(np.arange(n, dtype=np.int64), ids) if n > len(ids) else np.arange(n)
    if len(rest) > size:
        rest = np.sort(np.random.default_rng(config.seed + 1).choice(rest, size, replace=False))
    return ground_truth(rows, metric, ids), rows.take(rest)


def _fit(
    cand: Candidate,
    rows: RowSource,
    metric: str,
    sample: np.ndarray,
    centroids: dict[int, np.ndarray],
    seed: int,
    progress: Progress,
    ids: np.ndarray | None = None,
) -> FactoryIndex:
    """Train `cand` (k-means lists shared across candidates of the same size) and add every row."""
    index = FactoryIndex(factory=cand.factory, metric=metric)
    quantizer = None
    if cand.nlist and cand.factory.startswith("IVF") and "_" not in cand.factory.split(",")[0]:
        if cand.nlist not in centroids:
            centroids[cand.nlist] = _kmeans(sample, cand.nlist, metric, seed)
        quantizer = _flat(centroids[cand.nlist], metric)
    index.train(sample, quantizer=quantizer)
    progress.start(len(rows), 0, f"adding to {cand.factory}")
    start = 0
    for block in rows.blocks():
        index.add(block, None if ids is None else ids[start : start + len(block)])
        start += len(block)
        progress.advance(len(block))
    progress.stop()
    return index.attach(rows, ids)


def _kmeans(sample: np.ndarray, k: int, metric: str, seed: int) -> np.ndarray:
    import faiss

    x = np.ascontiguousarray(sample, np.float32)
    if metric == "cosine":
        from retrieval.index.base import normalize_rows

        x = normalize_rows(x)
    km = faiss.Kmeans(x.shape[1], k, niter=KMEANS_ITER, seed=seed + 1, spherical=metric == "cosine")
    km.cp.max_points_per_centroid = TRAIN_MAX  # the sample is already the size we want
    km.train(x)
    return km.centroids


def _flat(centroids: np.ndarray, metric: str):  # -> faiss.Index
    import faiss

    q = faiss.IndexFlatL2(centroids.shape[1]) if metric == "l2" else faiss.IndexFlatIP(centroids.shape[1])
    q.add(centroids)
    return q
