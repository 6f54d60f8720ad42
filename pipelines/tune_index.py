"""`retrieve tune`: re-pick the operating point of an index's trained approximate search, in place."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.atomic import write_json
from retrieval.config import SearchConfig
from retrieval.errors import RetrieveError
from retrieval.index import FactoryIndex
from retrieval.index.tune import ground_truth, operating_point, query_ids, sweep
from retrieval.progress import Progress
from retrieval.store import MANIFEST, generation_dir, read_manifest, shard_rows, writer_lock


@dataclass(frozen=True)
class TuneReport:
    index: Path
    factory: str
    before: dict[str, Any]  # the search_index record it had
    after: dict[str, Any]  # and the one it has now


def tune_index(
    index_dir: str | Path,
    min_recall: float,
    max_latency_ms: float = SearchConfig.max_latency_ms,
    progress: Progress | None = None,
) -> TuneReport:
    """Measure every operating point of the live index again and record the fastest reaching
    `min_recall` (the trained index file is not touched: only the manifest's parameters change).

    Refuses, changing nothing, when no point of this index reaches it: that needs a new build.
    """
    progress = progress or Progress()
    config = SearchConfig(min_recall=min_recall, max_latency_ms=max_latency_ms)
    index_dir = Path(index_dir)
    with writer_lock(index_dir, progress.warn):
        manifest = read_manifest(index_dir)
        record = manifest.search_index
        if record.get("type") != "faiss":
            raise RetrieveError(
                f"{index_dir} searches exactly (recall 1.0): there is nothing to tune. Build an "
                "approximate index with `retrieve index --search auto` (above 100k images) or "
                "`--search approximate`."
            )
        rows = shard_rows(index_dir, manifest)
        index = FactoryIndex.load(
            generation_dir(index_dir, manifest) / "index.faiss",
            metric=manifest.metric,
            record=record,
            rows=rows,
        )
        queries = int(record.get("recall_queries", config.queries))
        truth = ground_truth(rows, manifest.metric, query_ids(len(rows), queries, config.seed))
        lossy = not index.factory.endswith(",Flat")
        points = sweep(index, rows, truth, lossy)
        point, ok = operating_point(index, points, truth, min_recall, max_latency_ms)
        if not ok:
            raise RetrieveError(
                f"{index.factory} reaches recall@10 {point.recall:.3f} at best "
                f"({', '.join(f'{k} {v}' for k, v in point.params.items())}) under {max_latency_ms:g} ms, "
                f"below {min_recall}; nothing was changed. Rebuild with `retrieve index --min-recall "
                f"{min_recall}` to choose a larger index."
            )
        after = {
            **record,
            "params": dict(point.params),
            **point.record(len(truth.ids)),
            "min_recall": min_recall,
        }
        write_json(index_dir / MANIFEST, dataclasses.replace(manifest, search_index=after).to_dict())
    return TuneReport(index_dir, index.factory, dict(record), after)
