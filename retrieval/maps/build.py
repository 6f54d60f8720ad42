"""Map jobs, index in and file out: `MapConfig`, `build_map` (the HTML page) and `build_grid` (a PNG)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.config import known_keys
from retrieval.errors import RetrieveError, UnknownNameError
from retrieval.maps.atlas import default_thumb_size, read_thumbnails
from retrieval.maps.cache import cached_atlases, cached_neighbours, cached_projection
from retrieval.maps.grid import grid_assign, render_grid
from retrieval.maps.page import MapPage, render_map
from retrieval.maps.projection import METHOD_NAMES, MIN_NONLINEAR, ProjectionParams, default_jobs

if TYPE_CHECKING:
    from retrieval.api import Index

COLOR_BY = ("label", "folder", "none")


@dataclass(frozen=True)
class MapConfig:
    """Settings of `retrieve map` / `build_map` / `build_grid`."""

    out: Path  # the HTML page (or the PNG with `grid`)
    projection: ProjectionParams = field(default_factory=ProjectionParams)
    color_by: str = "label"  # label | folder (first path component) | none
    max_points: int | None = None  # stratified sample by label when the index holds more
    k: int = 10  # neighbours listed on click, in the original feature space
    thumb_size: int | None = None  # px, a multiple of 16; None = 64 up to 10k points, 48 up to 30k, else 32
    grid: tuple[int, int] | None = None  # (columns, rows): render a PNG grid instead of the page
    jobs: int | None = None  # CPU processes/threads; None = the CPUs this process may use
    cache: bool = True  # reuse coordinates, neighbours and thumbnails cached in the index directory
    title: str | None = None  # page title; None = from the index

    def __post_init__(self) -> None:
        if self.color_by not in COLOR_BY:
            raise UnknownNameError(
                f"Unknown «color_by» {self.color_by!r}; choose one of {', '.join(COLOR_BY)}."
            )
        if self.max_points is not None and self.max_points < 1:
            raise RetrieveError("«max_points» must be at least 1")
        if self.k < 1:
            raise RetrieveError("k must be at least 1")
        if self.thumb_size is not None and (self.thumb_size % 16 or not 16 <= self.thumb_size <= 256):
            # Multiples of 16 keep every thumbnail on JPEG block boundaries: no colour bleeds between tiles.
            raise RetrieveError("«thumb_size» must be a multiple of 16 between 16 and 256")
        if self.grid is not None and (self.grid[0] < 1 or self.grid[1] < 1):
            raise RetrieveError("the grid needs at least one column and one row")
        if self.jobs is not None and self.jobs < 1:
            raise RetrieveError("jobs must be at least 1")
        # The file's name should say what is in it: a PNG named .html (or the reverse) opens as garbage.
        suffix = Path(self.out).suffix.lower()
        if self.grid is not None and suffix in (".html", ".htm"):
            raise RetrieveError(f"«grid» writes a PNG image; name the output .png, not {self.out}")
        if self.grid is None and suffix == ".png":
            raise RetrieveError(
                f"the map is an HTML page; name the output .html, not {self.out} (or add «grid» for a PNG)"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MapConfig:
        return cls(**known_keys(cls, d))


@dataclass(frozen=True)
class MapReport:
    """What `build_map` / `build_grid` made."""

    out: Path
    shown: int
    total: int
    method: str
    explained_variance: tuple[float, ...]
    variance_note: str
    bytes: int
    missing: int  # thumbnails that could not be read (placeholders)
    seconds: dict[str, float]  # per stage
    cached: dict[str, bool]


def stratified_sample(labels: Sequence[str], max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted ids of at most `max_points` items, each label represented in proportion (at least one each
    while the budget allows), chosen at random within a label with a seeded generator."""
    n = len(labels)
    if max_points >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    names, codes = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    counts = np.bincount(codes, minlength=len(names))
    quota = counts * (max_points / n)
    take = np.floor(quota).astype(np.int64)
    if max_points >= len(names):
        take = np.maximum(take, 1)
    # Largest remainders get the leftover budget (or give it back when the minimum of one overshot).
    spare = max_points - int(take.sum())
    order = np.argsort(-(quota - np.floor(quota)), kind="stable")
    if spare > 0:
        for c in order:
            if spare == 0:
                break
            if take[c] < counts[c]:
                take[c] += 1
                spare -= 1
    elif spare < 0:
        for c in np.argsort(-take, kind="stable"):
            while spare < 0 and take[c] > 1:
                take[c] -= 1
                spare += 1
    chosen = [
        rng.choice(np.flatnonzero(codes == c), size=int(t), replace=False) for c, t in enumerate(take) if t
    ]
    return np.sort(np.concatenate(chosen)) if chosen else np.arange(0)


def _groups(paths: Sequence[str], labels: Sequence[str], color_by: str) -> list[str]:
    if color_by == "label":
        return list(labels)
    if color_by == "folder":
        return [p.split("/", 1)[0] if "/" in p else "." for p in paths]
    return ["all"] * len(paths)


def _sample(index: Index, limit: int | None, seed: int) -> np.ndarray:
    n = len(index)
    if limit is None or limit >= n:
        return np.arange(n)
    return stratified_sample(index.labels, limit, seed)


def _method_for(p: ProjectionParams, n: int, note: Callable[[str], None]) -> ProjectionParams:
    """The projection that will really run: below MIN_NONLINEAR points t-SNE and UMAP have no
    neighbourhoods to keep and `run_projection` uses PCA, so the page and the report say PCA."""
    if p.method == "pca" or n >= MIN_NONLINEAR:
        return p
    note(f"{n} images are too few for {METHOD_NAMES[p.method]} (it needs {MIN_NONLINEAR}); using PCA")
    return replace(p, method="pca")


def _items(index: Index, ids: np.ndarray, nb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The page's items and each shown point's neighbours as item numbers (-1 = none).

    Items: the m points shown, then the neighbours that the sample left out (listed, not drawn)."""
    n = len(index)
    extra = np.setdiff1d(np.unique(nb[nb >= 0]), ids)
    item_ids = np.concatenate([ids, extra]).astype(np.int64)
    item_of = np.full(n, -1, np.int64)
    item_of[item_ids] = np.arange(len(item_ids))
    nb_items = np.where(nb >= 0, item_of[np.maximum(nb, 0)], -1)
    return item_ids, nb_items


def _info(index: Index, p: ProjectionParams, variance: str, missing: int, color_by: str) -> dict[str, Any]:
    """What the page states about how it was made, as text."""
    manifest = index.manifest
    return {
        "method": METHOD_NAMES[p.method],
        "params": {k_: v for k_, v in asdict(p).items() if k_ != "method"},
        "variance": variance,
        "backbone": manifest.backbone,
        "layer": manifest.layer,
        "dim": index.dim,
        "metric": index.metric,
        "index": str(index.path),
        "root": str(index.root),
        # Percent-encoded by pathlib: a root holding "#", "?" or "%" still names the folder.
        "rootUrl": Path(str(index.root)).absolute().as_uri().rstrip("/") + "/",
        "generation": index.dir.name,
        "missing": missing,
        "colorBy": color_by,
        "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def default_title(index: Index, method: str, shown: int) -> str:
    """What the map shows, in words: the folder, the space (backbone and weights), the method, how many."""
    m = index.manifest
    space = (
        "raw-pixel space" if m.backbone == "pixels" else f"{m.backbone} feature space ({m.weights.words()})"
    )
    n = len(index)
    count = f"{shown:,} of {n:,} images" if shown < n else f"{n:,} images"
    return f"{Path(str(index.root)).name} in {space}: {method} of {count}"


def build_map(index: Index, config: MapConfig, note: Callable[[str], None] = lambda s: None) -> MapReport:
    """Project the index (or a stratified sample), look up neighbours, and write the HTML map.

    `index` is an open Index or the path of one."""
    if not hasattr(index, "manifest"):
        from retrieval.api import open_index

        index = open_index(index)
    if config.grid is not None:
        return build_grid(index, config, note)
    times: dict[str, float] = {}
    jobs = config.jobs or default_jobs()
    ids = _sample(index, config.max_points, config.projection.seed)
    m, n = len(ids), len(index)
    size = config.thumb_size or default_thumb_size(m)
    p = _method_for(config.projection, m, note)
    doing = f"{METHOD_NAMES[p.method]} of {m:,} of {n:,} vectors ({index.dim}-d)..."
    t = time.perf_counter()
    proj = cached_projection(index, ids, p, jobs, config.cache, note, computing=doing)
    times["projection"] = time.perf_counter() - t  # this run's time: a cached one is near zero
    t = time.perf_counter()
    k = min(config.k, max(1, n - 1))
    nb, dist, nb_cached = cached_neighbours(index, ids, k, config.cache, note)
    times["neighbours"] = time.perf_counter() - t
    t = time.perf_counter()
    atlases, missing, th_cached = cached_atlases(index, ids, size, jobs, config.cache, note)
    times["thumbnails"] = time.perf_counter() - t
    item_ids, nb_items = _items(index, ids, nb)
    paths, labels = index.paths, index.labels
    item_paths = [paths[i] for i in item_ids]
    item_labels = [labels[i] for i in item_ids]
    page = MapPage(
        coords=proj.coords,
        paths=item_paths,
        labels=item_labels,
        ids=item_ids,
        neighbours=nb_items,
        distances=dist,
        thumb_size=size,
        total=n,
        title=config.title or default_title(index, METHOD_NAMES[p.method], m),
        groups=_groups(item_paths, item_labels, config.color_by),
        info=_info(index, p, proj.variance_note, len(missing), config.color_by),
    )
    t = time.perf_counter()
    nbytes = render_map(config.out, page, atlases)
    times["html"] = time.perf_counter() - t
    return MapReport(
        out=Path(config.out).absolute(),
        shown=m,
        total=n,
        method=p.method,
        explained_variance=proj.explained_variance,
        variance_note=proj.variance_note,
        bytes=nbytes,
        missing=len(missing),
        seconds=times,
        cached={"projection": proj.cached, "neighbours": nb_cached, "thumbnails": th_cached},
    )


def build_grid(index: Index, config: MapConfig, note: Callable[[str], None] = lambda s: None) -> MapReport:
    """Project (a stratified sample of) the index and render it as a PNG grid, one thumbnail per cell."""
    if config.grid is None:
        raise RetrieveError("build_grid needs config.grid = (columns, rows)")
    width, height = config.grid
    times: dict[str, float] = {}
    jobs = config.jobs or default_jobs()
    limit = width * height if config.max_points is None else min(width * height, config.max_points)
    ids = _sample(index, limit, config.projection.seed)
    p = _method_for(config.projection, len(ids), note)
    doing = f"{METHOD_NAMES[p.method]} of {len(ids):,} of {len(index):,} vectors, snapped to a {width}x{height} grid..."
    t = time.perf_counter()
    proj = cached_projection(index, ids, p, jobs, config.cache, note, computing=doing)
    times["projection"] = time.perf_counter() - t
    t = time.perf_counter()
    cells = grid_assign(proj.coords, width, height)
    times["assignment"] = time.perf_counter() - t
    t = time.perf_counter()
    size = config.thumb_size or 64
    missing: list[str] = []
    paths = index.paths
    thumbs = read_thumbnails(index.root, [paths[i] for i in ids], size, jobs, missing)
    nbytes = render_grid(config.out, cells, thumbs, width, height, size)
    times["png"] = time.perf_counter() - t
    return MapReport(
        out=Path(config.out).absolute(),
        shown=len(ids),
        total=len(index),
        method=p.method,
        explained_variance=proj.explained_variance,
        variance_note=proj.variance_note,
        bytes=nbytes,
        missing=len(missing),
        seconds=times,
        cached={"projection": proj.cached},
    )
