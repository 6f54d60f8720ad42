"""CLI: `retrieve eval` (metrics table), `retrieve neighbours` (the sheet) and `retrieve demo` (the whole story)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from retrieval.cli._app import command, console, err_console, esc
from retrieval.cli._indexes import IndexesArg, IndexesOpt, open_many, remember_last_index

if TYPE_CHECKING:
    from retrieval.evaluate import SpaceResult

QueriesOpt = Annotated[
    Path | None,
    typer.Option(
        "--queries",
        "-q",
        help="Folder of labelled query images (label = parent folder), embedded in each space. "
        "Default: leave-one-out, every indexed image queries the others.",
        show_default=False,
    ),
]


def parse_ks(text: str) -> list[int]:
    from retrieval.errors import RetrieveError

    try:
        ks = sorted({int(v) for v in text.replace(" ", "").split(",") if v})
    except ValueError:
        raise RetrieveError(
            f"-k/--cutoffs takes comma-separated positive integers, e.g. 1,5,10 (got {text!r})."
        ) from None
    if not ks or ks[0] < 1:
        raise RetrieveError(
            f"-k/--cutoffs takes comma-separated positive integers, e.g. 1,5,10 (got {text!r})."
        )
    return ks


def _embed_queries(spaces: Sequence, queries: Path, device: str, say: bool = True) -> list:
    """The query folder embedded in each space; files that cannot be read are listed once and left out."""
    from retrieval.evaluate import embed_query_folder

    sets = []
    for idx in spaces:
        if say:
            err_console.print(
                f"embedding queries from {queries} with {idx.path.name}", highlight=False, markup=False
            )
        sets.append(embed_query_folder(idx, queries, device=device))
        if sets[-1].paths != sets[0].paths:  # a file one backbone read and another could not
            from retrieval.errors import RetrieveError

            odd = sorted(set(sets[-1].paths) ^ set(sets[0].paths))
            raise RetrieveError(
                f"The query images that could be read differ between {spaces[0].path.name} and "
                f"{idx.path.name} ({', '.join(odd[:5])}); the spaces must be compared on the same queries."
            )
    for path, reason in sets[0].skipped:
        err_console.print(
            f"[yellow]skipped query:[/] {esc(queries / path)}: {esc(reason)}", highlight=False, soft_wrap=True
        )
    return sets


def _describe(results: Sequence[SpaceResult], queries: Path | None) -> str:
    r = results[0]
    if r.mode == "leave-one-out":
        return f"leave-one-out over {r.n_database:,} images (each queries the other {r.n_database - 1:,})"
    return f"{r.n_queries_total:,} queries from {queries} against {r.n_database:,} images"


def print_table(results: Sequence[SpaceResult], caption: str) -> None:
    """One row per space, the best value of each column starred; laid out for the terminal's width."""
    from retrieval.cli._table import print_metrics
    from retrieval.evaluate import best_per_metric

    print_metrics(console, results, caption, best_per_metric(results), esc)


def results_json(results: Sequence[SpaceResult], ks: Sequence[int]) -> dict:
    from retrieval.evaluate import best_per_metric

    best = best_per_metric(results)
    return _json_safe(
        {
            "ks": list(ks),
            "spaces": [r.to_dict() for r in results],
            "best": {m: [results[i].name for i in rows] for m, rows in best.items()},
        }
    )


def _json_safe(obj: Any) -> Any:
    """NaN and infinity (a metric with no query to average over) as null: JSON has no NaN."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def results_csv(results: Sequence[SpaceResult]) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    names = list(results[0].metrics)
    writer.writerow(["space", "mode", "database", "queries", *names])
    for r in results:
        writer.writerow([r.name, r.mode, r.n_database, r.n_queries, *(f"{r.metrics[n]:.6f}" for n in names)])
    return buf.getvalue()


@command("eval")
def eval_cli(
    indexes: IndexesArg = None,
    index_opt: IndexesOpt = None,
    queries: QueriesOpt = None,
    k: Annotated[
        str, typer.Option("-k", "--cutoffs", help="Cut-offs for P@k, R@k and kNN@k, comma-separated.")
    ] = "1,5,10",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV on stdout, one row per space.")] = False,
    full_map: Annotated[
        bool | None,
        typer.Option(
            "--full-map/--no-full-map",
            help="mAP over the whole ranking. Default: on up to 400M query x image pairs.",
            show_default=False,
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="Device for embedding --queries.")] = "auto",
    exact: Annotated[
        bool,
        typer.Option(
            "--exact",
            help="Exact neighbours from the stored vectors, even where the index is approximate: "
            "measures the space rather than the index.",
        ),
    ] = False,
) -> None:
    """Retrieval quality of one or more spaces from their labels: P@k, R@k, R-precision, MAP@R, mAP, kNN@k.

    Several indexes of the same images (e.g. pixels, resnet18, a trained checkpoint) give one table
    with the best value per column marked. Neighbours come through each index's own search, as a
    query gets them: exact below 100k images, and for an approximate index (see `retrieve info`)
    its re-ranked answers, said in a note. --exact searches the stored vectors exhaustively. The
    whole-ranking mAP is always exact.

    Examples:

      retrieve eval ./idx-pixels ./idx-r8            # leave-one-out, one table
      retrieve eval ./idx-r8 --queries ./test -k 1,5,10 --json
      retrieve eval -i ./idx-pixels -i ./idx-r8 --csv > quality.csv
      retrieve eval ./idx-1m --exact                 # the space, not the approximate index
    """
    from retrieval.errors import RetrieveError
    from retrieval.evaluate import check_same_images, evaluate_indexes

    if as_json and as_csv:
        raise RetrieveError("Choose one of --json and --csv.")
    ks = parse_ks(k)
    spaces = open_many(indexes, index_opt)
    check_same_images(spaces)  # before embedding any query
    query_sets = _embed_queries(spaces, queries, device) if queries is not None else None
    results = evaluate_indexes(spaces, query_sets, ks=ks, full_map=full_map, exact=exact)
    for note in dict.fromkeys(n for r in results for n in r.notes):
        err_console.print(f"[yellow]note:[/] {esc(note)}", highlight=False)
    if as_json:
        payload = results_json(results, ks)
        if query_sets and query_sets[0].skipped:
            payload["skipped_queries"] = [{"path": p, "reason": r} for p, r in query_sets[0].skipped]
        console.print_json(json.dumps(payload))
    elif as_csv:
        typer.echo(results_csv(results), nl=False)
    else:
        print_table(results, _describe(results, queries))


@command("neighbours")
def neighbours_cli(
    indexes: IndexesArg = None,
    index_opt: IndexesOpt = None,
    queries: QueriesOpt = None,
    n: Annotated[
        int, typer.Option("-n", "--num-queries", help="Query images on the sheet (spread over labels).")
    ] = 8,
    k: Annotated[int, typer.Option("-k", "--top-k", help="Neighbours per query and space.")] = 5,
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML page; a PNG is written beside it.")] = Path(
        "neighbours.html"
    ),
    seed: Annotated[int, typer.Option(help="Seeds the choice of queries.")] = 0,
    device: Annotated[str, typer.Option(help="Device for embedding --queries.")] = "auto",
) -> None:
    """The slide: N query images, and for each space a row with the query and its k nearest neighbours.

    Wrong-label neighbours are outlined in red. Writes a self-contained HTML page and a PNG.

    Examples:

      retrieve neighbours ./idx-pixels ./idx-r8 -n 8 -k 5 --out sheet.html
      retrieve neighbours ./idx-r8 --queries ./test --seed 3
    """
    from retrieval.errors import RetrieveError
    from retrieval.evaluate import check_same_images
    from retrieval.sheet import neighbour_blocks, write_sheet

    if n < 1 or k < 1:
        raise RetrieveError("-n/--num-queries and -k/--top-k must be at least 1.")
    spaces = open_many(indexes, index_opt)
    check_same_images(spaces)
    query_sets = _embed_queries(spaces, queries, device, say=False) if queries is not None else None
    blocks = neighbour_blocks(
        spaces, query_sets, queries.absolute() if queries else None, n=n, k=k, seed=seed
    )
    where = f"queries from {queries}" if queries else f"queries from {spaces[0].path.name} (leave-one-out)"
    html_path, png_path = write_sheet(blocks, out, title=f"Nearest neighbours: {where}")
    console.print(f"sheet: {html_path}\npng:   {png_path}", highlight=False, markup=False)


@command("demo")
def demo_cli(
    folder: Annotated[
        Path, typer.Argument(help="Where the sample images, model, indexes and pages go.")
    ] = Path("retrieve-demo"),
    epochs: Annotated[
        int | None,
        typer.Option(help="Training epochs. (default: the demo's measured setting)", show_default=False),
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option(
            help="Network to train, e.g. resnet8_small, lenet. (default: the demo's)", show_default=False
        ),
    ] = None,
    per_class: Annotated[
        int | None,
        typer.Option(help="Training images per class. (default: the demo's setting)", show_default=False),
    ] = None,
    test_per_class: Annotated[
        int | None,
        typer.Option(help="Held-out query images per class. (default: the demo's)", show_default=False),
    ] = None,
    imagenet: Annotated[
        bool,
        typer.Option(
            "--imagenet/--no-imagenet",
            help="Also index with efficientnet_lite0's ImageNet features, frozen (installed with "
            "retrieve; about 60 s of the run on 2 cores).",
        ),
    ] = True,
    device: Annotated[str, typer.Option(help="auto (CUDA > MPS > CPU), cpu, cuda, mps.")] = "auto",
    fresh: Annotated[bool, typer.Option(help="Redo every step instead of reusing what is there.")] = False,
) -> None:
    """The whole story, offline: generate labelled shapes, train a small convnet on CPU, index with pixels
    and with the trained network, print the eval table, and write the neighbours sheet and the map.

    About 2.5 minutes on 2 CPU cores (1.5 with --no-imagenet). Re-running reuses every finished step (same settings, same
    results).

    Examples:

      retrieve demo                                 # into ./retrieve-demo
      retrieve demo /tmp/demo --epochs 60 --fresh
    """
    from dataclasses import replace

    from pipelines.demo import DemoConfig, run_demo

    config = DemoConfig(out=folder, device=device, fresh=fresh)
    if not imagenet:
        config = replace(config, pretrained=None)
    overrides = {"epochs": epochs, "arch": arch, "per_class": per_class, "test_per_class": test_per_class}
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    report = run_demo(config, progress=_DemoProgress())
    # `retrieve query IMAGE` with no --index then searches the trained space.
    remember_last_index(report.indexes[report.trained])
    print_table(report.results, report.caption)
    for note in dict.fromkeys(n for r in report.results for n in r.notes):
        err_console.print(f"[yellow]note:[/] {esc(note)}", highlight=False)
    typer.echo(report.summary())


class _DemoProgress:
    """Step lines on stderr (the table and summary go to stdout)."""

    def step(self, text: str) -> None:
        err_console.print(f"[bold cyan]>[/] {esc(text)}", highlight=False)

    def note(self, text: str) -> None:
        err_console.print(f"  [dim]{esc(text)}[/]", highlight=False)
