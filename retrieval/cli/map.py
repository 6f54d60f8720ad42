"""CLI: `retrieve map`: a thin wrapper over `retrieval.maps.build_map` / `build_grid`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from retrieval.cli._app import command, err_console
from retrieval.cli._indexes import IndexArg, IndexOpt, open_one


@command("map")
def map_cli(
    index: IndexArg = None,
    index_opt: IndexOpt = None,
    method: Annotated[str, typer.Option("--method", "-m", help="tsne, umap or pca.")] = "tsne",
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output file. Default: map.html, or grid.png with --grid."),
    ] = None,
    color_by: Annotated[
        str, typer.Option("--color-by", help="label (parent folder), folder (first path component) or none.")
    ] = "label",
    grid: Annotated[
        str | None,
        typer.Option(
            help="COLUMNSxROWS: snap to a grid and write a PNG, one thumbnail per cell (e.g. 40x40)."
        ),
    ] = None,
    max_points: Annotated[
        int | None, typer.Option(help="Show at most this many images, sampled stratified by label.")
    ] = None,
    k: Annotated[int, typer.Option("-k", "--top-k", help="Neighbours listed when an image is clicked.")] = 10,
    thumb_size: Annotated[
        int | None,
        typer.Option(
            help="Thumbnail side in px (multiple of 16). Default: 64 up to 10k points, 48, then 32."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed of the projection and the sample.")] = 0,
    perplexity: Annotated[float, typer.Option(help="t-SNE perplexity.")] = 30.0,
    n_neighbors: Annotated[int, typer.Option(help="UMAP neighbours.")] = 15,
    min_dist: Annotated[float, typer.Option(help="UMAP minimum distance.")] = 0.1,
    pca_dims: Annotated[
        int, typer.Option(help="Reduce to this many principal components before t-SNE/UMAP (0: never).")
    ] = 50,
    jobs: Annotated[int | None, typer.Option(help="CPU threads/processes. Default: all available.")] = None,
    cache: Annotated[
        bool, typer.Option(help="Reuse coordinates, neighbours and thumbnails cached in the index.")
    ] = True,
    title: Annotated[str | None, typer.Option(help="Page title.")] = None,
) -> None:
    """Project the index to 2-D and write an interactive HTML map you can open offline (or a PNG grid).

    The page has every image as a thumbnail: pan and zoom, hover for a preview, click for the
    nearest neighbours in the original feature space (as `retrieve query --id`), search by file
    name, toggle classes in the legend, lasso-select and copy paths.

    Examples:

      retrieve map                                  # last index, t-SNE, map.html
      retrieve map ./idx-r8 --method umap --out r8-umap.html
      retrieve map ./idx-r8 --grid 40x40 --out grid.png
      retrieve map ./idx-r8 --max-points 50000     # a stratified sample; the page says so
    """
    from retrieval.maps import METHOD_NAMES, MapConfig, ProjectionParams, build_map, parse_grid

    shape = parse_grid(grid) if grid else None
    config = MapConfig(
        out=out or Path("grid.png" if shape else "map.html"),
        projection=ProjectionParams(
            method=method.lower(),
            seed=seed,
            pca_dims=pca_dims,
            perplexity=perplexity,
            n_neighbors=n_neighbors,
            min_dist=min_dist,
        ),
        color_by=color_by,
        max_points=max_points,
        k=k,
        thumb_size=thumb_size,
        grid=shape,
        jobs=jobs,
        cache=cache,
        title=title,
    )
    idx = open_one(index, index_opt)
    report = build_map(idx, config, note=lambda s: err_console.print(s, highlight=False, markup=False))
    stages = ", ".join(
        f"{name} {sec:.1f}s{' (cached)' if report.cached.get(name) else ''}"
        for name, sec in report.seconds.items()
    )
    shown = f"{report.shown:,} of {report.total:,}" if report.shown < report.total else f"{report.total:,}"
    err_console.print(
        f"[bold green]map[/] {METHOD_NAMES[report.method]} of {shown} images, {report.bytes / 1e6:.1f} MB "
        f"[dim]({stages})[/]",
        highlight=False,
    )
    if report.variance_note:
        err_console.print(report.variance_note, highlight=False, markup=False)
    if report.missing:
        err_console.print(
            f"[yellow]{report.missing} images could not be read[/] (placeholders on the map)", highlight=False
        )
    err_console.print(f"{'grid' if shape else 'map'}: {report.out}", highlight=False, markup=False)
