"""Projection of vectors to 2-D (PCA, t-SNE, UMAP): pure functions over arrays."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from retrieval.errors import RetrieveError, UnknownNameError
from retrieval.index import ExactIndex, drop_self

METHODS = ("tsne", "umap", "pca")
METHOD_NAMES = {"tsne": "t-SNE", "umap": "UMAP", "pca": "PCA"}
# Below this many points t-SNE and UMAP have too few neighbours to mean anything: use PCA.
MIN_NONLINEAR = 10
# openTSNE's FFT gradient has a fixed cost per iteration (its interpolation grid) that Barnes-Hut
# beats on small sets: the two cross near 4k points on 2 cores, and at 200 points FFT took ~20x longer.
TSNE_FFT_MIN = 5000


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
            raise RetrieveError(f"«min_dist» must be between 0 and 1, not {self.min_dist}")


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


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
