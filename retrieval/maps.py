"""Embedding maps: project vectors to 2-D (PCA, t-SNE, UMAP), snap them to a grid, render HTML or PNG."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from retrieval.config import known_keys
from retrieval.errors import RetrieveError, UnknownNameError
from retrieval.index import ExactIndex, drop_self

if TYPE_CHECKING:
    from retrieval.api import Index

METHODS = ("tsne", "umap", "pca")
METHOD_NAMES = {"tsne": "t-SNE", "umap": "UMAP", "pca": "PCA"}
COLOR_BY = ("label", "folder", "none")
CACHE_VERSION = 1
ASSETS = Path(__file__).with_name("map_assets")
# Atlases are at most this many pixels on a side: one decode per atlas stays cheap, every browser
# accepts the size as a canvas source and a WebGL texture, and 100k thumbnails need ~25 of them.
ATLAS_SIDE = 2048
# Below this many points t-SNE and UMAP have too few neighbours to mean anything: use PCA.
MIN_NONLINEAR = 10
# openTSNE's FFT gradient has a fixed cost per iteration (its interpolation grid) that Barnes-Hut
# beats on small sets: the two cross near 4k points on 2 cores, and at 200 points FFT took ~20x longer.
TSNE_FFT_MIN = 5000


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class ProjectionParams:
    """How vectors become 2-D coordinates; every field is part of the cache key."""

    method: str = "tsne"  # tsne | umap | pca
    seed: int = 0
    pca_dims: int = 50  # t-SNE/UMAP run on this many principal components when the dim is higher; 0 = never
    perplexity: float = 30.0  # t-SNE; lowered to (n - 1) / 3 on tiny sets
    # t-SNE iterations, chosen by measurement (bench/map.py): KL settles within ~100 iterations of
    # early exaggeration, and 375 more at learning rate n give maps whose 10-NN preservation is
    # within a few points of openTSNE's 250 + 500 default at ~40% of the time.
    tsne_early_iters: int = 125
    tsne_iters: int = 375
    n_neighbors: int = 15  # UMAP
    min_dist: float = 0.1  # UMAP

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UnknownNameError(f"Unknown map method {self.method!r}; choose one of {', '.join(METHODS)}.")
        if self.perplexity <= 0 or self.n_neighbors < 2 or self.pca_dims < 0:
            raise RetrieveError("perplexity must be > 0, n_neighbors >= 2 and pca_dims >= 0")
        if self.tsne_early_iters < 0 or self.tsne_iters < 1:
            raise RetrieveError("t-SNE needs at least one iteration")
        if not 0 <= self.min_dist <= 1:  # UMAP's own check would be a traceback
            raise RetrieveError(f"--min-dist must be between 0 and 1, not {self.min_dist}")


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
                f"Unknown --color-by {self.color_by!r}; choose one of {', '.join(COLOR_BY)}."
            )
        if self.max_points is not None and self.max_points < 1:
            raise RetrieveError("--max-points must be at least 1")
        if self.k < 1:
            raise RetrieveError("k must be at least 1")
        if self.thumb_size is not None and (self.thumb_size % 16 or not 16 <= self.thumb_size <= 256):
            # Multiples of 16 keep every thumbnail on JPEG block boundaries: no colour bleeds between tiles.
            raise RetrieveError("--thumb-size must be a multiple of 16 between 16 and 256")
        if self.grid is not None and (self.grid[0] < 1 or self.grid[1] < 1):
            raise RetrieveError("the grid needs at least one column and one row")
        if self.jobs is not None and self.jobs < 1:
            raise RetrieveError("jobs must be at least 1")
        # The file's name should say what is in it: a PNG named .html (or the reverse) opens as garbage.
        suffix = Path(self.out).suffix.lower()
        if self.grid is not None and suffix in (".html", ".htm"):
            raise RetrieveError(f"--grid writes a PNG image; name the output .png, not {self.out}")
        if self.grid is None and suffix == ".png":
            raise RetrieveError(
                f"the map is an HTML page; name the output .html, not {self.out} (or add --grid for a PNG)"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MapConfig:
        return cls(**known_keys(cls, d))


def parse_grid(text: str) -> tuple[int, int]:
    """'40x30' -> (40, 30): columns x rows."""
    try:
        w, h = (int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise RetrieveError(f"--grid takes COLUMNSxROWS, e.g. 40x40, not {text!r}") from None
    if w < 1 or h < 1 or w * h > 1_000_000:
        raise RetrieveError(f"--grid {text}: columns and rows must be >= 1 and at most a million cells")
    return w, h


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def default_thumb_size(n: int) -> int:
    """Larger thumbnails for small sets; 32 px keeps 100k points near 30 MB of HTML."""
    return 64 if n <= 10_000 else 48 if n <= 30_000 else 32


# ----------------------------------------------------------------------------------------------
# Projection (pure functions over arrays)


@dataclass(frozen=True)
class Projection:
    """2-D coordinates and how they were made."""

    coords: np.ndarray  # [n, 2] float32
    params: ProjectionParams
    explained_variance: tuple[float, ...]  # variance ratio of each principal component kept
    seconds: float
    cached: bool = False

    @property
    def variance_note(self) -> str:
        ev = self.explained_variance
        if not ev or len(self.coords) < 3:  # one or two points have no variance worth a note
            return ""
        if self.params.method == "pca":
            return ", ".join(f"PC{i + 1} {v:.1%}" for i, v in enumerate(ev)) + " of the variance"
        return f"PCA to {len(ev)} dims keeps {sum(ev):.1%} of the variance"


def pca(x: np.ndarray, n_components: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Principal components (float32) and the explained variance ratio of each."""
    from sklearn.decomposition import PCA

    n, dim = x.shape
    c = max(1, min(n_components, n, dim))
    # n >> dim: the dim x dim covariance eigendecomposition is exact, fast and deterministic; a very
    # wide input (a 25k-d conv map) would need a dim^2 matrix, so use the seeded randomized SVD there.
    solver = (
        "covariance_eigh" if dim <= 4096 and n >= dim else "randomized" if c < 0.8 * min(n, dim) else "full"
    )
    model = PCA(n_components=c, svd_solver=solver, random_state=seed)
    with np.errstate(invalid="ignore", divide="ignore"):  # constant data has a zero total variance
        y = model.fit_transform(np.asarray(x, dtype=np.float32)).astype(np.float32)
        ratio = np.nan_to_num(np.asarray(model.explained_variance_ratio_, dtype=np.float64))
    return y, ratio


def _exact_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours of every row among the others: (ids int64, Euclidean distances)."""
    # The projection's neighbour graph (90 a point at t-SNE's default): FAISS's own distances suffice.
    d, ids = ExactIndex(metric="l2").fit(x).search(x, k + 1, refine=False)  # Euclidean, inf where missing
    ids, d = drop_self(ids, d, np.arange(len(x)), k)
    return ids, d.astype(np.float64)


def _tsne(x: np.ndarray, p: ProjectionParams, jobs: int, principal: bool = True) -> np.ndarray:
    """openTSNE's FFT-accelerated t-SNE on exact FAISS neighbours (see bench/map.py for the choice)."""
    from openTSNE import TSNE, affinity
    from openTSNE.initialization import rescale
    from openTSNE.nearest_neighbors import KNNIndex

    n = len(x)
    perplexity = min(p.perplexity, (n - 1) / 3)
    k = min(n - 1, int(3 * perplexity))

    class FaissKNN(KNNIndex):
        # Exact neighbours by BLAS on <= 50 dims beat Annoy's approximate ones by ~3x at 50k points.
        VALID_METRICS = ("euclidean",)

        def build(self) -> tuple[np.ndarray, np.ndarray]:
            return _exact_knn(self.data, self.k)

    knn = FaissKNN(x, k, n_jobs=jobs, random_state=p.seed)
    aff = affinity.PerplexityBasedNN(perplexity=perplexity, knn_index=knn, n_jobs=jobs)
    # openTSNE's own PCA initialisation, from the components we already have: the first two,
    # rescaled to std 1e-4 so early exaggeration starts from a faithful global layout.
    # `principal`: x is already in PCA coordinates; otherwise take its first two components here.
    first2 = x[:, :2] if principal else pca(x, 2, p.seed)[0]
    init = rescale(np.array(first2, dtype=np.float64)) if first2.shape[1] >= 2 else None
    tsne = TSNE(
        n_components=2,
        early_exaggeration_iter=p.tsne_early_iters,
        n_iter=p.tsne_iters,
        # Two interpolation intervals per unit: the FFT grid grows with the embedding's extent,
        # and this halves its side for a KL within 1% (measured at 20k points).
        **(
            {"ints_in_interval": 2, "negative_gradient_method": "fft"}
            if n >= TSNE_FFT_MIN
            else {"negative_gradient_method": "bh"}
        ),
        n_jobs=jobs,
        random_state=p.seed,
        verbose=False,
    )
    init_arg = init if init is not None and np.all(np.isfinite(init)) else "random"
    return np.asarray(tsne.fit(affinities=aff, initialization=init_arg), dtype=np.float32)


def _umap(x: np.ndarray, p: ProjectionParams, jobs: int) -> np.ndarray:
    """umap-learn on exact FAISS neighbours (NN-descent is the slow, single-threaded part when seeded)."""
    with warnings.catch_warnings():
        # umap-learn warns that a seed forces one thread; that is the price of reproducible maps.
        warnings.filterwarnings("ignore", message=".*n_jobs.*overridden.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="umap")
        import umap

        n = len(x)
        k = max(2, min(p.n_neighbors, n - 1))
        ids, dist = _exact_knn(x, k - 1)
        # UMAP's convention: each point is its own first neighbour at distance 0.
        ids = np.concatenate([np.arange(n)[:, None], ids], axis=1)
        dist = np.concatenate([np.zeros((n, 1)), dist], axis=1).astype(np.float32)
        model = umap.UMAP(
            n_neighbors=k,
            min_dist=p.min_dist,
            random_state=p.seed,
            precomputed_knn=(ids, dist, None),
            n_jobs=1,
            init="spectral" if n > 100 else "random",
            verbose=False,
        )
        return np.asarray(model.fit_transform(x), dtype=np.float32)


def run_projection(vectors: np.ndarray, params: ProjectionParams, jobs: int | None = None) -> Projection:
    """Project rows of `vectors` to 2-D as `params` says; deterministic for a given seed and jobs."""
    t0 = time.perf_counter()
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise RetrieveError(f"need a non-empty 2-D array of vectors to project, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise RetrieveError("the vectors contain NaN or infinity; re-index with a working backbone")
    jobs = jobs or default_jobs()
    n, dim = x.shape
    if params.method == "pca" or n < MIN_NONLINEAR:
        y, ratio = pca(x, 2, params.seed)
        coords = np.zeros((n, 2), np.float32)
        coords[:, : y.shape[1]] = y
        ev = tuple(float(v) for v in ratio)
    else:
        principal = bool(params.pca_dims and dim > params.pca_dims)
        if principal:
            x, ratio = pca(x, params.pca_dims, params.seed)
            ev = tuple(float(v) for v in ratio)
        else:
            x = x - x.mean(axis=0)
            ev = ()
        coords = _tsne(x, params, jobs, principal) if params.method == "tsne" else _umap(x, params, jobs)
    return Projection(coords.astype(np.float32), params, ev, time.perf_counter() - t0)


def project(
    vectors: np.ndarray, method: str = "tsne", *, seed: int = 0, jobs: int | None = None, **options: Any
) -> np.ndarray:
    """2-D coordinates [n, 2] of the rows of `vectors` by PCA, t-SNE or UMAP (options: ProjectionParams)."""
    known = {f.name for f in fields(ProjectionParams)} - {"method", "seed"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise RetrieveError(f"Unknown projection options {unknown}; known: {sorted(known)}")
    return run_projection(vectors, ProjectionParams(method=method, seed=seed, **options), jobs).coords


def normalise_coords(coords: np.ndarray) -> np.ndarray:
    """Fit into [0, 1]^2 keeping the aspect ratio (the shorter side is centred)."""
    c = np.asarray(coords, dtype=np.float64)
    if len(c) == 0:
        return c.astype(np.float32)
    lo, hi = c.min(axis=0), c.max(axis=0)
    span = float((hi - lo).max()) or 1.0
    return ((c - lo) / span + (1 - (hi - lo) / span) / 2).astype(np.float32)


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


# ----------------------------------------------------------------------------------------------
# Grid assignment (pure)


def _lsa(points: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Optimal assignment of points to distinct cells (squared distance); returns a cell per point."""
    from scipy.optimize import linear_sum_assignment

    cost = ((points[:, None, :] - cells[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    out = np.empty(len(points), dtype=np.int64)
    out[rows] = cols
    return out


def _unit(c: np.ndarray) -> np.ndarray:
    lo, hi = c.min(axis=0), c.max(axis=0)
    return (c - lo) / np.where(hi > lo, hi - lo, 1.0)


def grid_assign(
    coords: np.ndarray, width: int, height: int, *, exact_max_cells: int = 2500, tile: int = 24
) -> np.ndarray:
    """Snap points to distinct cells of a width x height grid; returns the row-major cell of each point.

    Up to `exact_max_cells` cells: the optimal linear assignment (squared distance to the cell
    centres after scaling both axes to the grid), like Karpathy's t-SNE grids. Larger grids: a
    fast approximation that keeps neighbours together: rows by y then x (balanced), refined by exact
    assignment inside tiles of tile x tile cells, twice, the second pass offset by half a tile.
    """
    c = np.asarray(coords, dtype=np.float64)
    n, cells = len(c), width * height
    if n > cells:
        raise RetrieveError(f"{n} points do not fit a {width}x{height} grid; sample them first")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    u = _unit(c) * [width, height]
    centres = np.stack(np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5), -1).reshape(-1, 2)
    if cells <= exact_max_cells:
        return _lsa(u, centres)
    # Balanced rows: row r holds counts[r] points, the lowest y first; columns spread evenly by x.
    cell = np.empty(n, dtype=np.int64)
    by_y = np.argsort(u[:, 1], kind="stable")
    counts = np.full(height, n // height) + (np.arange(height) < n % height)
    start = 0
    for r, m in enumerate(counts):
        row = by_y[start : start + m]
        start += m
        row = row[np.argsort(u[row, 0], kind="stable")]
        cell[row] = r * width + np.floor((np.arange(m) + 0.5) * width / m).astype(np.int64)
    owner = np.full(cells, -1, dtype=np.int64)
    owner[cell] = np.arange(n)
    grid_ids = np.arange(cells).reshape(height, width)
    for offset in (0, tile // 2):
        for r0 in range(-offset if offset else 0, height, tile):
            for c0 in range(-offset if offset else 0, width, tile):
                block = grid_ids[max(r0, 0) : r0 + tile, max(c0, 0) : c0 + tile].ravel()
                pts = owner[block]
                pts = pts[pts >= 0]
                if len(pts) < 2:
                    continue
                # Local frame: the points' own spread mapped onto the tile keeps their relative layout.
                bx, by = block % width, block // width
                local_cells = np.stack([bx - bx.min() + 0.5, by - by.min() + 0.5], 1)
                span = np.array([bx.max() - bx.min() + 1, by.max() - by.min() + 1], dtype=np.float64)
                choice = _lsa(_unit(u[pts]) * span, local_cells)
                owner[block] = -1
                owner[block[choice]] = pts
                cell[pts] = block[choice]
    return cell


# ----------------------------------------------------------------------------------------------
# Thumbnails and sprite atlases


def _thumb_job(args: tuple[str, int]) -> tuple[bytes, bool]:
    from retrieval.images import open_image, placeholder, square_thumbnail

    path, size = args
    try:
        img = open_image(
            path, draft=lambda w, h: (max(1, w * size * 2 // min(w, h)), max(1, h * size * 2 // min(w, h)))
        )
        return square_thumbnail(img, size).tobytes(), True
    except Exception:  # missing, unreadable, or changed since indexing: a placeholder, never a crash
        return placeholder(size).tobytes(), False


def read_thumbnails(
    root: Path, relpaths: Sequence[str], size: int, jobs: int = 1, missing: list[str] | None = None
) -> Iterator[np.ndarray]:
    """Thumbnails of `root / relpath` in order; failures become placeholders and are appended to `missing`."""
    args = [(str(Path(root) / p), size) for p in relpaths]
    if jobs > 1 and len(args) >= 256:
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(max_workers=jobs)
        results: Iterable[tuple[bytes, bool]] = pool.map(_thumb_job, args, chunksize=64)
    else:
        pool = None
        results = map(_thumb_job, args)
    try:
        for rel, (data, ok) in zip(relpaths, results, strict=True):
            if not ok and missing is not None:
                missing.append(rel)
            yield np.frombuffer(data, dtype=np.uint8).reshape(size, size, 3)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def atlas_columns(size: int) -> int:
    return ATLAS_SIDE // size


def make_atlases(thumbs: Iterable[np.ndarray], size: int, quality: int = 82) -> list[bytes]:
    """Pack size x size thumbnails row-major into JPEG atlases of at most ATLAS_SIDE px a side.

    Thumbnail i sits in atlas i // per_atlas, at column j % cols and row j // cols of it
    (j = i % per_atlas, cols = ATLAS_SIDE // size): the page computes the same positions.
    """
    from PIL import Image

    cols = atlas_columns(size)
    per = cols * cols
    out: list[bytes] = []
    buf: list[np.ndarray] = []

    def flush() -> None:
        rows = math.ceil(len(buf) / cols)
        sheet = np.zeros((rows * size, cols * size if rows > 1 else len(buf) * size, 3), np.uint8)
        for j, t in enumerate(buf):
            r, c = divmod(j, cols)
            sheet[r * size : (r + 1) * size, c * size : (c + 1) * size] = t
        b = io.BytesIO()
        Image.fromarray(sheet).save(b, format="JPEG", quality=quality, optimize=True)
        out.append(b.getvalue())
        buf.clear()

    for t in thumbs:
        buf.append(t)
        if len(buf) == per:
            flush()
    if buf:
        flush()
    return out


# ----------------------------------------------------------------------------------------------
# The HTML page


@dataclass(frozen=True)
class MapPage:
    """Everything the page shows. Items 0..m-1 are the points on the map (coords, thumbnails);
    items after them are neighbours that the sample left out (path and label only)."""

    coords: np.ndarray  # [m, 2], any scale
    paths: Sequence[str]  # every item's path, relative to the index root
    labels: Sequence[str]  # every item's label
    ids: np.ndarray  # every item's id in the index
    neighbours: np.ndarray  # [m, k] item numbers in the original feature space, -1 = none
    distances: np.ndarray  # [m, k]
    thumb_size: int
    total: int  # images in the index: the page says "m of total shown"
    title: str = "retrieve map"
    groups: Sequence[str] | None = None  # colour key per item (default: the label)
    info: dict[str, Any] = field(default_factory=dict)  # method, backbone, metric... shown as text


def _b64(a: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes()).decode("ascii")


def _json_for_script(obj: Any) -> str:
    """JSON that is inert inside <script type="application/json">: no <, >, & can end or open a tag."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (
        ("&", "\\u0026"),
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(ch, esc)
    return text


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def page_payload(page: MapPage) -> dict[str, Any]:
    """The JSON the page script reads (typed arrays as little-endian base64)."""
    m = len(page.coords)
    n_items = len(page.paths)
    if len(page.labels) != n_items or len(page.ids) != n_items or m > n_items:
        raise RetrieveError("map page: paths, labels and ids must cover every item, the shown ones first")
    groups = list(page.groups) if page.groups is not None else list(page.labels)
    names, codes = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    label_names, label_codes = np.unique(
        np.asarray(page.labels, dtype=object).astype(str), return_inverse=True
    )
    nb = np.asarray(page.neighbours, dtype=np.int64).reshape(m, -1)
    dist = np.asarray(page.distances, dtype=np.float32).reshape(m, -1)
    dist = np.where(np.isfinite(dist), dist, -1.0)
    return {
        "version": 1,
        "title": page.title,
        "shown": m,
        "total": int(page.total),
        "items": n_items,
        "paths": [str(p) for p in page.paths],
        "labelNames": [str(v) for v in label_names],
        "labels": _b64(label_codes, "<u4"),
        "groupNames": [str(v) for v in names],
        "groups": _b64(codes, "<u4"),
        "ids": _b64(page.ids, "<i4"),
        "xy": _b64(normalise_coords(page.coords), "<f4"),
        "k": int(nb.shape[1]),
        "neighbours": _b64(nb, "<i4"),
        "distances": _b64(dist, "<f4"),
        "thumb": {"size": page.thumb_size, "cols": atlas_columns(page.thumb_size)},
        "info": page.info,
    }


def _atomic_write_bytes(path: Path, chunks: Iterable[bytes]) -> int:
    """Stream `chunks` into `path` atomically; returns the number of bytes written."""
    from retrieval.atomic import atomic_write

    n = 0

    def write(fh: IO[bytes]) -> None:
        nonlocal n
        for c in chunks:
            n += fh.write(c)

    atomic_write(path, write)
    return n


def render_map(out: str | os.PathLike, page: MapPage, atlases: Sequence[bytes]) -> int:
    """Write the self-contained HTML map (atomically); returns its size in bytes.

    One file: the CSS, the script and the data are inline, thumbnails are JPEG atlases in base64
    blocks, and a Content-Security-Policy allows only this page's own script (by hash), so the
    page makes no request and no text from a file name can ever run as code.
    """
    css = (ASSETS / "map.css").read_text()
    js = (ASSETS / "map.js").read_text()
    template = (ASSETS / "map.html").read_text()
    if "</script" in js.lower() or "</style" in css.lower():
        raise RetrieveError("map assets must not contain closing tags")  # a packaging error, not user input
    csp = (
        "default-src 'none'; "
        f"script-src {_csp_hash(js)}; style-src {_csp_hash(css)}; "
        "img-src data: blob:; base-uri 'none'; form-action 'none'"
    )
    head, rest = template.split("{{BODY_DATA}}")
    # The title goes in last, so text in it can never be mistaken for another placeholder.
    head = (
        head.replace("{{CSP}}", html.escape(csp))
        .replace("{{CSS}}", css)
        .replace("{{TITLE}}", html.escape(page.title))
    )
    rest = rest.replace("{{JS}}", js)
    data = _json_for_script(page_payload(page))

    def chunks() -> Iterator[bytes]:
        yield head.encode()
        yield b'<script type="application/json" id="map-data">' + data.encode() + b"</script>\n"
        for a in atlases:
            yield b'<script type="text/plain" class="atlas">' + base64.b64encode(a) + b"</script>\n"
        yield rest.encode()

    return _atomic_write_bytes(Path(out), chunks())


def render_grid(
    out: str | os.PathLike,
    cells: np.ndarray,
    thumbs: Iterable[np.ndarray],
    width: int,
    height: int,
    size: int,
) -> int:
    """A PNG of width x height cells, thumbnail i in cell cells[i]; empty cells stay white."""
    from PIL import Image

    sheet = np.full((height * size, width * size, 3), 255, np.uint8)
    for c, t in zip(cells, thumbs, strict=False):
        r, col = divmod(int(c), width)
        sheet[r * size : (r + 1) * size, col * size : (col + 1) * size] = t
    b = io.BytesIO()
    Image.fromarray(sheet).save(b, format="PNG", optimize=False)
    return _atomic_write_bytes(Path(out), [b.getvalue()])


# ----------------------------------------------------------------------------------------------
# Cache in the index's generation directory (immutable, so generation + parameters is the key)


def _ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()[:16]


def _vectors_digest(vectors: np.ndarray, ids: np.ndarray, block: int = 65536) -> str:
    """A hash of the rows `ids` of `vectors`: the cache follows the numbers themselves, not only the
    generation's name (a rebuilt index can reuse a name; ~0.2 s for 100k x 512)."""
    h = hashlib.sha256()
    for s in range(0, len(ids), block):
        h.update(np.ascontiguousarray(vectors[ids[s : s + block]], dtype="<f4").tobytes())
    return h.hexdigest()[:20]


def _files_digest(root: Path, relpaths: Iterable[str]) -> str:
    """A hash of the size, mtime, ctime and inode of each file: thumbnails follow the files, not only
    their names (an image edited, replaced or swapped with another keeps its path; ~3 us a file)."""
    h = hashlib.sha256()
    for rel in relpaths:
        try:
            st = (Path(root) / rel).stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n".encode())
        except OSError:  # missing now: a placeholder, and the cache must notice when it returns
            h.update(f"{rel}\0-\n".encode())
    return h.hexdigest()[:20]


def _cache_path(index: Index, kind: str, key: dict[str, Any]) -> Path:
    blob = json.dumps(
        {"v": CACHE_VERSION, "generation": index.dir.name, "n": len(index), **key}, sort_keys=True
    )
    return index.dir / "maps" / f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:20]}.npz"


def _cache_load(path: Path, use: bool) -> dict[str, np.ndarray] | None:
    if not use or not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:  # a damaged cache file is recomputed, never trusted
        return None


def _cache_save(path: Path, arrays: dict[str, np.ndarray], note: Callable[[str], None]) -> None:
    b = io.BytesIO()
    np.savez(b, **arrays)
    try:
        _atomic_write_bytes(path, [b.getvalue()])
    except OSError as exc:  # a read-only index still gets its map, just without the cache
        note(f"note: cannot cache in {path.parent} ({exc.strerror or exc}); the next run recomputes")


def cached_projection(
    index: Index,
    ids: np.ndarray,
    params: ProjectionParams,
    jobs: int | None = None,
    use_cache: bool = True,
    note: Callable[[str], None] = lambda s: None,
) -> Projection:
    """The projection of the index's vectors `ids`, from the cache when the same one was made before."""
    vectors = index.vectors()
    key = {"ids": _ids_digest(ids), "vectors": _vectors_digest(vectors, ids), "metric": index.metric}
    path = _cache_path(index, "coords", {**key, **asdict(params)})
    hit = _cache_load(path, use_cache)
    if hit is not None and hit.get("coords", np.zeros(0)).shape == (len(ids), 2):
        return Projection(
            hit["coords"],
            params,
            tuple(float(v) for v in hit["explained_variance"]),
            float(hit["seconds"]),
            cached=True,
        )
    x = np.asarray(vectors[ids], dtype=np.float32)
    if index.metric == "cosine":
        from retrieval.index import normalize_rows

        x = normalize_rows(x)  # the map should show the geometry the index searches in
    proj = run_projection(x, params, jobs)
    _cache_save(
        path,
        {
            "coords": proj.coords,
            "explained_variance": np.asarray(proj.explained_variance, np.float64),
            "seconds": np.float64(proj.seconds),
        },
        note,
    )
    return proj


def neighbour_table(
    index: Index, ids: np.ndarray, k: int, batch: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours (index ids, distances) of the index's images `ids`, in the original feature
    space, through the index's own FAISS searcher: the same lists as `Index.search_ids(ids, k)`."""
    vectors = index.vectors()
    kk = min(k + 1, len(index))
    out_ids = np.full((len(ids), k), -1, np.int64)
    out_d = np.full((len(ids), k), np.inf, np.float32)
    for s in range(0, len(ids), batch):
        q = np.asarray(ids[s : s + batch], dtype=np.int64)
        d, nb = index.searcher.search(np.asarray(vectors[q], dtype=np.float32), kk)
        nb, d = drop_self(nb, d, q, k)
        out_ids[s : s + len(q), : nb.shape[1]] = nb
        out_d[s : s + len(q), : d.shape[1]] = d
    return out_ids, out_d


def cached_neighbours(
    index: Index,
    ids: np.ndarray,
    k: int,
    use_cache: bool = True,
    note: Callable[[str], None] = lambda s: None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    path = _cache_path(index, "neighbours", {"ids": _ids_digest(ids), "k": k})
    hit = _cache_load(path, use_cache)
    if hit is not None and hit.get("ids", np.zeros(0)).shape == (len(ids), k):
        return hit["ids"], hit["distances"], True
    nb, d = neighbour_table(index, ids, k)
    _cache_save(path, {"ids": nb, "distances": d}, note)
    return nb, d, False


def cached_atlases(
    index: Index,
    ids: np.ndarray,
    size: int,
    jobs: int,
    use_cache: bool = True,
    note: Callable[[str], None] = lambda s: None,
) -> tuple[list[bytes], list[str], bool]:
    """JPEG atlases of the thumbnails of `ids` and the paths that could not be read."""
    paths = index.paths
    shown = [paths[i] for i in ids]
    files = _files_digest(index.root, shown)
    path = _cache_path(index, "atlases", {"ids": _ids_digest(ids), "size": size, "files": files})
    hit = _cache_load(path, use_cache)
    if hit is not None and "offsets" in hit:
        blob, offsets = hit["blob"].tobytes(), hit["offsets"]
        missing = [str(p) for p in hit["missing"]]
        return [blob[a:b] for a, b in itertools.pairwise(offsets)], missing, True
    missing: list[str] = []
    atlases = make_atlases(read_thumbnails(index.root, shown, size, jobs, missing), size)
    offsets = np.cumsum([0, *map(len, atlases)])
    _cache_save(
        path,
        {
            "blob": np.frombuffer(b"".join(atlases), np.uint8),
            "offsets": offsets,
            "missing": np.asarray(missing, dtype=str) if missing else np.zeros(0, dtype="<U1"),
        },
        note,
    )
    return atlases, missing, False


# ----------------------------------------------------------------------------------------------
# Jobs: index in, file out


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
    note(f"{METHOD_NAMES[p.method]} of {m:,} of {n:,} vectors ({index.dim}-d)...")
    proj = cached_projection(index, ids, p, jobs, config.cache, note)
    times["projection"] = proj.seconds
    t = time.perf_counter()
    k = min(config.k, max(1, n - 1))
    nb, dist, nb_cached = cached_neighbours(index, ids, k, config.cache, note)
    times["neighbours"] = time.perf_counter() - t
    t = time.perf_counter()
    atlases, missing, th_cached = cached_atlases(index, ids, size, jobs, config.cache, note)
    times["thumbnails"] = time.perf_counter() - t
    # Items: the m points shown, then the neighbours that the sample left out (listed, not drawn).
    shown_set = np.zeros(n, bool)
    shown_set[ids] = True
    extra = np.setdiff1d(np.unique(nb[nb >= 0]), ids)
    item_ids = np.concatenate([ids, extra]).astype(np.int64)
    item_of = np.full(n, -1, np.int64)
    item_of[item_ids] = np.arange(len(item_ids))
    nb_items = np.where(nb >= 0, item_of[np.maximum(nb, 0)], -1)
    paths, labels = index.paths, index.labels
    item_paths = [paths[i] for i in item_ids]
    item_labels = [labels[i] for i in item_ids]
    m_ = index.manifest
    info = {
        "method": METHOD_NAMES[p.method],
        "params": {k_: v for k_, v in asdict(p).items() if k_ != "method"},
        "variance": proj.variance_note,
        "backbone": m_.backbone,
        "layer": m_.layer,
        "dim": index.dim,
        "metric": index.metric,
        "index": str(index.path),
        "root": str(index.root),
        "generation": index.dir.name,
        "missing": len(missing),
        "colorBy": config.color_by,
        "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    page = MapPage(
        coords=proj.coords,
        paths=item_paths,
        labels=item_labels,
        ids=item_ids,
        neighbours=nb_items,
        distances=dist,
        thumb_size=size,
        total=n,
        title=config.title or f"{Path(str(index.root)).name}: {METHOD_NAMES[p.method]} map ({m_.backbone})",
        groups=_groups(item_paths, item_labels, config.color_by),
        info=info,
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
    note(
        f"{METHOD_NAMES[p.method]} of {len(ids):,} of {len(index):,} vectors, snapped to a {width}x{height} grid..."
    )
    proj = cached_projection(index, ids, p, jobs, config.cache, note)
    times["projection"] = proj.seconds
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
