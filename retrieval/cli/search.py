"""CLI: `retrieve tune` (re-pick an approximate index's operating point) and `index --vectors`: thin wrappers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from retrieval.cli._app import command, err_console, esc
from retrieval.cli._indexes import IndexArg, IndexOpt, last_index, remember_last_index
from retrieval.cli._progress import RichProgress
from retrieval.cli._table import search_row


@command("tune")
def tune_cli(
    index: IndexArg = None,
    index_opt: IndexOpt = None,
    min_recall: Annotated[
        float, typer.Option(help="recall@10 against exact search the operating point must measure.")
    ] = 0.95,
    max_latency: Annotated[
        float, typer.Option("--max-latency-ms", help="p50 milliseconds of one query it must stay under.")
    ] = 10.0,
) -> None:
    """Re-pick the operating point (IVF probes, HNSW beam, re-rank depth) of an approximate index.

    Measures recall@10 against exact search on the same 1,000 held-out images as the build, and
    records the fastest setting that reaches --min-recall. The trained index is reused as it is:
    only the manifest changes, atomically. Raising the goal beyond what the index can reach is
    refused with what it reaches; rebuild with `retrieve index --min-recall` then.

    Examples:

      retrieve tune --min-recall 0.98               # the last index built
      retrieve tune ./idx-photos --min-recall 0.9   # a lower goal: faster
    """
    from pipelines.tune_index import tune_index
    from retrieval.errors import RetrieveError

    if index is not None and index_opt is not None and Path(index) != Path(index_opt):
        raise RetrieveError(f"Two indexes given ({index} and --index {index_opt}); name one.")
    report = tune_index(index or index_opt or last_index(), min_recall, max_latency)
    err_console.print(f"[dim]index:[/] {esc(report.index)}", highlight=False)
    err_console.print(f"before: {esc(search_row(report.before))}", highlight=False)
    err_console.print(f"[bold green]now:[/]    {esc(search_row(report.after))}", highlight=False)


def index_vectors(images, vectors: Path, index: Path | None, metric: str, search, column: str) -> None:
    """`retrieve index --vectors`: precomputed embeddings, with the same search choice as images."""
    from pipelines.index_vectors import build_from_vectors
    from retrieval.errors import RetrieveError

    if images is not None:
        raise RetrieveError(f"Give either a folder of images ({images}) or --vectors, not both.")
    index = index or Path("indexes") / f"{vectors.absolute().name}-vectors"
    report = build_from_vectors(vectors, index, metric, search, column, progress=RichProgress())
    remember_last_index(report.index)
    err_console.print(
        f"[bold green]indexed[/] {report.indexed:,} vectors of {report.dim} dims from {report.files} file(s)",
        highlight=False,
    )
    err_console.print(f"search: {search_row(report.search)}", highlight=False, markup=False)
    err_console.print(f"index: {report.index}", highlight=False, markup=False)
