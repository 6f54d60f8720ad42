"""Embedding maps: project vectors to 2-D (PCA, t-SNE, UMAP), snap them to a grid, render HTML or PNG.

Modules, lowest first: `projection` (pure), `grid` (pure assignment + the PNG), `atlas` (thumbnails),
`page` (the HTML page, its assets in `assets/`), `write` (atomic output files), `cache` (in the
index directory), `build` (the jobs).
"""

from retrieval.maps.atlas import ATLAS_SIDE, atlas_columns, default_thumb_size, make_atlases, read_thumbnails
from retrieval.maps.build import COLOR_BY, MapConfig, MapReport, build_grid, build_map, stratified_sample
from retrieval.maps.cache import cached_atlases, cached_neighbours, cached_projection, neighbour_table
from retrieval.maps.grid import grid_assign, parse_grid, render_grid
from retrieval.maps.page import MapPage, normalise_coords, page_payload, render_map
from retrieval.maps.projection import (
    METHOD_NAMES,
    METHODS,
    MIN_NONLINEAR,
    Projection,
    ProjectionParams,
    default_jobs,
    pca,
    project,
    run_projection,
)

__all__ = [
    "ATLAS_SIDE",
    "COLOR_BY",
    "METHODS",
    "METHOD_NAMES",
    "MIN_NONLINEAR",
    "MapConfig",
    "MapPage",
    "MapReport",
    "Projection",
    "ProjectionParams",
    "atlas_columns",
    "build_grid",
    "build_map",
    "cached_atlases",
    "cached_neighbours",
    "cached_projection",
    "default_jobs",
    "default_thumb_size",
    "grid_assign",
    "make_atlases",
    "neighbour_table",
    "normalise_coords",
    "page_payload",
    "parse_grid",
    "pca",
    "project",
    "read_thumbnails",
    "render_grid",
    "render_map",
    "run_projection",
    "stratified_sample",
]
