"""CLI: `retrieve index`, `query`, `info` and `backbones`: thin wrappers over pipelines and the API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from retrieval.cli._app import command, console, err_console, esc
from retrieval.cli._indexes import IndexOpt, open_one, remember_last_index
from retrieval.cli._progress import RichProgress


@command("index")
def index_cli(
    images: Annotated[
        Path | None, typer.Argument(help="Folder of images, scanned recursively; label = parent folder.")
    ] = None,
    index: Annotated[
        Path | None,
        typer.Option("--index", "-i", help="Where to write the index. Default: ./indexes/FOLDER-BACKBONE"),
    ] = None,
    backbone: Annotated[
        str | None,
        typer.Option(
            "--backbone", "-b", help="Registry name (see `retrieve backbones`). Default: efficientnet_lite0."
        ),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="imagenet | none (random init) | a checkpoint from `retrieve train`. Default: per backbone."
        ),
    ] = None,
    layer: Annotated[
        str | None, typer.Option(help="FX node to tap instead of the default (FC7 / pool).")
    ] = None,
    metric: Annotated[str, typer.Option(help="l2 (Euclidean) or cosine.")] = "l2",
    tta: Annotated[
        bool,
        typer.Option(
            "--tta/--no-tta",
            help="Embed each image as the mean of its and its mirror's features: 2x the compute, "
            "usually better neighbours for flip-trained nets. Queries are embedded the same way.",
        ),
    ] = False,
    device: Annotated[str, typer.Option(help="auto (CUDA > MPS > CPU), cpu, cuda, mps.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16 (autocast).")] = "auto",
    batch_size: Annotated[
        int | None, typer.Option(help="Images per batch. Default: 256 GPU, 32 CPU.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Decoding processes. Default: chosen for the device.")
    ] = None,
    shard_rows: Annotated[
        int, typer.Option(help="Vectors per on-disk shard (unit of resumable progress).")
    ] = 4096,
    flush_seconds: Annotated[
        float,
        typer.Option(help="Write a shard at least this often: an interrupted run loses at most this much."),
    ] = 30.0,
    search: Annotated[
        str,
        typer.Option(
            help="auto: below 100k images exact search; above, the cheapest IVF index (Flat, SQ8 or "
            "PQ codes re-ranked from the stored vectors) whose recall@10, measured against exact "
            "search on 1,000 held-out images, reaches --min-recall within --max-memory. exact: flat "
            "search whatever the size. Or any FAISS factory string, e.g. 'IVF4096,PQ64x4fs'.",
        ),
    ] = "auto",
    max_memory: Annotated[
        str | None,
        typer.Option(help="RAM the search index may hold, e.g. 2GB or 512MB. Default: half of RAM."),
    ] = None,
    min_recall: Annotated[
        float, typer.Option(help="recall@10 against exact search the chosen index must measure.")
    ] = 0.95,
    max_latency: Annotated[
        float,
        typer.Option("--max-latency-ms", help="p50 milliseconds of one query the choice must keep under."),
    ] = 10.0,
    vectors: Annotated[
        Path | None,
        typer.Option(
            help="Index precomputed embeddings instead of images: a folder of .npy shards, or parquet "
            "files with an embedding column and a path/id column (clip-retrieval's and autofaiss's layout).",
        ),
    ] = None,
    embedding_column: Annotated[
        str, typer.Option(help="The parquet column holding each row's vector (with --vectors).")
    ] = "embedding",
    rebuild: Annotated[
        bool,
        typer.Option(
            "--rebuild", help="Embed every file again and replace the index, whatever settings made it."
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Say what a sync would add, change and remove; write nothing."),
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify", help="Also hash files whose size and times agree (reads every file: slower)."
        ),
    ] = False,
) -> None:
    """Embed every image under IMAGES and write a FAISS index; run again, it syncs the index.

    A second run over the same folder embeds only the files added or changed since (by size, mtime
    and ctime: no file is read to find them), keeps a moved file's vector and id (found by its
    content hash) and drops the removed ones; with nothing changed it reads no image and writes
    nothing. Other settings (backbone, weights, layer, --tta, ...) are
    refused rather than mixed: pass --rebuild or another --index. Bad files are skipped and listed in
    the index's ledger. Interrupting is safe: the previous index stays readable and re-running the
    same command resumes where it stopped.

    Examples:

      retrieve index ./photos                       # efficientnet_lite0, ImageNet (installed, offline)
      retrieve index ./photos --backbone resnet50    # torchvision's ImageNet weights (fetched once)
      retrieve index ./photos --backbone pixels      # the raw-pixel baseline
      retrieve index ./photos --weights runs/r8/best.pt --index ./idx-r8
      retrieve index ./photos                       # again: syncs (or resumes an interrupted run)
      retrieve index ./photos --dry-run             # what a sync would add, change and remove
      retrieve index ./photos --rebuild             # embed everything again
      retrieve index ./photos --max-memory 2GB --min-recall 0.95   # approximate above 100k images
      retrieve index ./photos --search exact         # flat search, whatever the size
      retrieve index --vectors ./embeddings --index ./idx-emb   # .npy shards or parquet
    """
    from retrieval.config import IndexConfig, SearchConfig
    from retrieval.errors import RetrieveError
    from retrieval.index.factory import parse_size

    search_config = SearchConfig(
        search=search, max_memory=parse_size(max_memory), min_recall=min_recall, max_latency_ms=max_latency
    )
    if vectors is not None:
        from retrieval.cli.search import index_vectors

        return index_vectors(images, vectors, index, metric, search_config, embedding_column)
    if images is None:
        raise RetrieveError("Give the folder of images to index (or --vectors for precomputed embeddings).")
    # Imported past --vectors: precomputed embeddings need no torch (0.27 GB of a 1M build's memory).
    from pipelines.index_folder import build_index
    from retrieval.backbones import DEFAULT_BACKBONE

    if index is None:
        name = backbone or (
            Path(weights).stem if weights not in (None, "imagenet", "none") else DEFAULT_BACKBONE
        )
        index = Path("indexes") / f"{images.absolute().name}-{name}"
    config = IndexConfig(
        images=images,
        index=index,
        backbone=backbone,
        weights=weights,
        layer=layer,
        metric=metric,
        tta=tta,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        workers=workers,
        shard_rows=shard_rows,
        flush_seconds=flush_seconds,
        search=search_config,
        rebuild=rebuild,
        verify=verify,
    )
    if dry_run:
        return _dry_run(config)
    report = build_index(config, progress=RichProgress())
    remember_last_index(report.index)
    if report.sync:
        counts = ", ".join(f"{n:,} {what}" for what, n in report.sync.items())
        err_console.print(f"[bold green]synced[/] {counts}", highlight=False)
    reasons = ", ".join(f"{n} {k}" for k, n in sorted(report.skipped_reasons.items()))
    err_console.print(
        f"[bold green]indexed[/] {report.indexed} images ({report.embedded} embedded now) "
        f"[bold]skipped[/] {report.skipped}{f' ({reasons})' if reasons else ''} in {report.seconds:.1f}s, "
        f"{report.images_per_second:,.1f} img/s  [dim]{report.backbone} {report.dim}-d on {report.device}[/]",
        highlight=False,
    )
    err_console.print(f"index: {report.index}", highlight=False, markup=False)
    if report.skipped:
        err_console.print("skipped files: `retrieve info --skipped`", highlight=False)


def _dry_run(config) -> None:  # config: IndexConfig
    from pipelines.index_folder import plan_index

    plan = plan_index(config, RichProgress())
    if plan is None:
        why = "--rebuild" if config.rebuild else f"no index at {esc(config.index)} yet"
        err_console.print(f"{why}: every image would be embedded", highlight=False)
        return
    moved = [f"{old} -> {new}" for old, new in plan.renamed]
    for what, paths in (
        ("added", plan.added),
        ("changed", plan.changed),
        ("removed", plan.removed),
        ("moved", moved),
    ):
        console.print(f"[bold]{what}[/] {len(paths):,}", highlight=False)
        for path in paths[:10]:
            console.print(f"  {esc(path)}", highlight=False)
        if len(paths) > 10:
            console.print(f"  ... and {len(paths) - 10:,} more", highlight=False)
    console.print(f"[bold]unchanged[/] {plan.unchanged:,}", highlight=False)
    if plan.nothing_to_do:
        err_console.print("up to date: a sync would read no image and write nothing", highlight=False)


@command("query")
def query_cli(
    images: Annotated[list[Path] | None, typer.Argument(help="Image files to find neighbours of.")] = None,
    index: IndexOpt = None,
    k: Annotated[int, typer.Option("-k", "--top-k", help="Neighbours per query.")] = 10,
    id: Annotated[
        list[str] | None,
        typer.Option(
            "--id", help="An image already in the index (path relative to its root, or id); repeatable."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout.")] = False,
    device: Annotated[str, typer.Option(help="Device for embedding the query images.")] = "auto",
    exact: Annotated[
        bool,
        typer.Option(
            "--exact", help="Exact answers from the stored vectors, whatever the index's search kind."
        ),
    ] = False,
) -> None:
    """Find the k nearest neighbours (L2, or the index's metric) of images, in the index's feature space.

    A query that cannot be answered (an unreadable image, an id not in the index) is reported on
    stderr and the others are answered; the exit code is then 1 (2 when none could be).

    Examples:

      retrieve query cat.jpg -k 5                   # the last index built
      retrieve query cat.jpg dog.png --index ./idx-r8 --json
      retrieve query --id train/cats/12.jpg        # an indexed image (itself left out)
    """
    from retrieval.errors import RetrieveError
    from retrieval.query import Searcher, check_k

    if not images and not id:
        raise RetrieveError("Give image files to query, or --id for an image already in the index.")
    k = check_k(k)
    for path in images or []:
        if (Path(path) / "manifest.json").is_file():  # `retrieve query IMG idx-px` reads idx-px as a query
            raise RetrieveError(
                f"{path} is an index, not an image: name the index with --index "
                f"(`retrieve query IMAGE --index {path}`)."
            )
    idx = open_one(option=index)
    results = Searcher(idx, device=device, exact=exact).query(
        files=list(images or []), ids=list(id or []), k=k
    )
    failed = [r for r in results if not r.ok]
    for r in failed:
        err_console.print(f"[bold red]error:[/] {esc(r.error)}", highlight=False, soft_wrap=True)
    answered = [r for r in results if r.ok]
    if as_json:
        payload = {
            "index": str(idx.path),
            "backbone": idx.manifest.backbone,
            "weights": idx.manifest.weights.to_dict(),
            "metric": idx.metric,
            "root": idx.manifest.root,  # each neighbour's path is relative to it
            "results": [{"query": r.query, "neighbours": [h.to_dict() for h in r.hits]} for r in answered],
            "errors": [{"query": r.query, "error": r.error} for r in failed],
        }
        console.print_json(json.dumps(payload))
    else:
        _print_results(idx, [(r.query, r.hits) for r in answered])
    if failed:
        raise typer.Exit(1 if answered else 2)


def _print_results(idx, results: list[tuple[str, list]]) -> None:  # idx: retrieval.api.Index
    for q, hits in results:
        title = f"{esc(q)}  [dim]neighbours in {esc(idx.manifest.root)}[/]"
        table = Table(title=title, title_justify="left")
        for col, just in [("rank", "right"), ("distance", "right"), ("path", "left"), ("label", "left")]:
            table.add_column(col, justify=just)
        for h in hits:
            table.add_row(str(h.rank), f"{h.distance:.4f}", esc(h.path), esc(h.label))
        console.print(table)


@command("backbones")
def backbones_cli(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """The backbone registry: names, tapped layer, dimension, weights and preprocessing.

    Examples:

      retrieve backbones
      retrieve backbones --json
    """
    from retrieval.backbones import DEFAULT_BACKBONE, get_spec, list_backbones

    specs = [get_spec(n) for n in list_backbones()]
    if as_json:
        rows = [
            {
                "name": s.name,
                "layer": s.node,
                "dim": s.dim,
                "weights": s.weights,
                "default_weights": s.default_weights,
                "input": s.preprocess.size,
                "description": s.description,
                "train_recipe": dict(s.recipe),
            }
            for s in specs
        ]
        console.print_json(json.dumps(rows))
        return
    table = Table(title="backbones (use with --backbone)", title_justify="left")
    for col in ("name", "layer", "dim", "input", "imagenet weights", "description"):
        table.add_column(col)
    for s in specs:
        name = f"[bold]{s.name}[/] (default)" if s.name == DEFAULT_BACKBONE else s.name
        recipe = f" [dim](train recipe: {', '.join(f'{k}={v}' for k, v in s.recipe)})[/]" if s.recipe else ""
        table.add_row(
            name,
            s.node or "-",
            str(s.dim),
            f"{s.preprocess.size}px",
            s.weights or "-",
            s.description + recipe,
        )
    console.print(table)
