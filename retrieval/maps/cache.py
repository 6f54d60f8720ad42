"""Caches in the index's generation directory (immutable, so generation + parameters is the key):
coordinates, neighbour lists and thumbnail atlases."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.index import drop_self
from retrieval.maps import projection
from retrieval.maps.atlas import make_atlases, read_thumbnails
from retrieval.maps.projection import Projection, ProjectionParams
from retrieval.maps.write import atomic_write_bytes

if TYPE_CHECKING:
    from retrieval.api import Index

CACHE_VERSION = 1


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
        atomic_write_bytes(path, [b.getvalue()])
    except OSError as exc:  # a read-only index still gets its map, just without the cache
        note(f"note: cannot cache in {path.parent} ({exc.strerror or exc}); the next run recomputes")


def cached_projection(
    index: Index,
    ids: np.ndarray,
    params: ProjectionParams,
    jobs: int | None = None,
    use_cache: bool = True,
    note: Callable[[str], None] = lambda s: None,
    computing: str = "",
) -> Projection:
    """The projection of the index's vectors `ids`, from the cache when the same one was made before.

    `computing` is said through `note` only when the projection is computed: a cached run does not
    announce minutes of t-SNE it will not do."""
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
    if computing:
        note(computing)
    x = np.asarray(vectors[ids], dtype=np.float32)
    if index.metric == "cosine":
        from retrieval.index import normalize_rows

        x = normalize_rows(x)  # the map should show the geometry the index searches in
    # Looked up on its module at call time, so one patch of `projection.run_projection` sees every run.
    proj = projection.run_projection(x, params, jobs)
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
    space. Every image shown: through the index's own FAISS searcher, the same lists as
    `Index.search_ids(ids, k)`. A sample: the nearest among the sample, so that every neighbour the
    page lists is on the page, a thumbnail to click (the page says so)."""
    vectors = index.vectors()
    if len(np.unique(ids)) < len(index):
        return _neighbours_within(index, np.asarray(vectors[ids], dtype=np.float32), ids, k)
    kk = min(k + 1, len(index))
    out_ids = np.full((len(ids), k), -1, np.int64)
    out_d = np.full((len(ids), k), np.inf, np.float32)
    for s in range(0, len(ids), batch):
        q = np.asarray(ids[s : s + batch], dtype=np.int64)
        d, nb = index.vector_index.search(np.asarray(vectors[q], dtype=np.float32), kk)
        nb, d = drop_self(nb, d, q, k)
        out_ids[s : s + len(q), : nb.shape[1]] = nb
        out_d[s : s + len(q), : d.shape[1]] = d
    return out_ids, out_d


def _neighbours_within(index: Index, x: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    from retrieval.index import ExactIndex

    local = ExactIndex(metric=index.metric).fit(x)
    d, nb = local.search(x, min(k + 1, len(ids)))
    nb, d = drop_self(nb, d, np.arange(len(ids)), k)
    out_ids = np.full((len(ids), k), -1, np.int64)
    out_d = np.full((len(ids), k), np.inf, np.float32)
    out_ids[:, : nb.shape[1]] = np.where(nb >= 0, np.asarray(ids, np.int64)[np.maximum(nb, 0)], -1)
    out_d[:, : d.shape[1]] = d
    return out_ids, out_d


def cached_neighbours(
    index: Index,
    ids: np.ndarray,
    k: int,
    use_cache: bool = True,
    note: Callable[[str], None] = lambda s: None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    path = _cache_path(index, "neighbours", {"ids": _ids_digest(ids), "k": k, "within": "sample"})
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
