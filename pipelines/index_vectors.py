"""`retrieve index --vectors`: precomputed embeddings (.npy shards or parquet) into an index, no network.

The layouts clip-retrieval and autofaiss read and write: a folder of `.npy` files of float rows
(read in name order; row i of `part-3.npy` is called `part-3/i`), or `.parquet` files with an
embedding column (a list of floats per row) and, when present, a `path`/`image_path`/`id` column
naming each row. Every file is checked before anything is written: finite values, one dimension,
unique names. The build is a normal generation: crash-safe, with the measured search index.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.config import SearchConfig
from retrieval.errors import EmptyInputError, RetrieveError
from retrieval.preprocess import Preprocess
from retrieval.progress import Progress
from retrieval.store import STAGING, Manifest, Staging, WeightsRecord, commit, writer_lock

PRECOMPUTED = "precomputed"  # the backbone and weights kind of such an index: it embeds no images
NAME_COLUMNS = ("path", "image_path", "id", "key")


@dataclass(frozen=True)
class VectorsReport:
    index: Path
    indexed: int
    dim: int
    files: int
    search: dict


def vector_files(src: Path) -> list[Path]:
    """The .npy and .parquet files of `src` (a file or a folder, searched recursively), in name order."""
    if not src.exists():
        raise RetrieveError(f"{src} does not exist: give a folder of .npy or .parquet embedding files.")
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    files = [p for p in files if p.suffix.lower() in (".npy", ".parquet")]
    if not files:
        raise EmptyInputError(f"{src} holds no .npy or .parquet files of embeddings.")
    return files


def _blocks(path: Path, column: str) -> Iterator[tuple[np.ndarray, list[str]]]:
    """(vectors, names) of one file, a block at a time."""
    if path.suffix.lower() == ".npy":
        try:
            x = np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as exc:
            raise RetrieveError(f"{path} is not a readable .npy array ({exc}).") from None
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
            raise RetrieveError(
                f"{path} holds a {x.dtype} array of shape {x.shape}, not rows of real numbers."
            )
        for start in range(0, len(x), 65536):
            block = np.asarray(x[start : start + 65536], np.float32)
            yield block, [f"{path.stem}/{start + i}" for i in range(len(block))]
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise RetrieveError(f"{path} is not a readable parquet file ({exc}).") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise RetrieveError(
            f"{path} has no {column!r} column (it has: {', '.join(names)}); name the embedding column "
            "with --embedding-column."
        )
    key = next((c for c in NAME_COLUMNS if c in names), None)
    offset = 0
    for batch in pf.iter_batches(columns=[column] + ([key] if key else []), batch_size=65536):
        col = batch.column(column)
        if not pa.types.is_list(col.type) and not pa.types.is_fixed_size_list(col.type):
            raise RetrieveError(f"{path}: column {column!r} holds {col.type}, not lists of numbers.")
        lengths = col.value_lengths().to_numpy(zero_copy_only=False) if len(col) else np.zeros(0)
        if len(col) and (col.null_count or lengths.min() != lengths.max()):
            raise RetrieveError(f"{path}: rows of {column!r} are missing or of different lengths.")
        dim = int(lengths[0]) if len(col) else 0
        values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        block = values.reshape(len(col), dim)
        if key:
            labels = [str(v) for v in batch.column(key).to_pylist()]
        else:
            labels = [f"{path.stem}/{offset + i}" for i in range(len(col))]
        offset += len(col)
        yield block, labels


def _checked(files: list[Path], column: str) -> tuple[int, int]:
    """(rows, dim) of all files, or one clear error for the first bad one: read once, before writing."""
    dim, first, total, seen = None, None, 0, set()
    for f in files:
        for block, names in _blocks(f, column):
            if not len(block):
                continue
            if dim is None:
                dim, first = block.shape[1], f
            if block.shape[1] != dim:
                raise RetrieveError(
                    f"{f} holds {block.shape[1]}-d vectors, {first} holds {dim}-d: one dimension only."
                )
            bad = ~np.isfinite(block).all(axis=1)
            if bad.any():
                raise RetrieveError(f"{f}: row {names[int(np.argmax(bad))]} holds NaN or infinity.")
            for n in names:
                if n in seen:
                    raise RetrieveError(f"{f}: the name {n!r} is given to two rows; names must be unique.")
                seen.add(n)
            total += len(block)
    if not total or dim is None or dim == 0:
        raise EmptyInputError(f"the {len(files)} embedding file(s) hold no vectors; nothing was indexed.")
    return total, dim


def build_from_vectors(
    src: str | Path,
    index_dir: str | Path,
    metric: str = "l2",
    search: SearchConfig | None = None,
    column: str = "embedding",
    shard_rows: int = 65536,
    progress: Progress | None = None,
) -> VectorsReport:
    """Index precomputed embeddings: checked, staged, committed as a new generation with its search index."""
    from retrieval import __version__
    from retrieval.index import check_metric

    progress = progress or Progress()
    check_metric(metric)
    src, index_dir = Path(src).absolute(), Path(index_dir)
    files = vector_files(src)
    total, dim = _checked(files, column)
    digest = hashlib.sha256(
        "\n".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files).encode()
    )
    manifest = Manifest(
        retrieve_version=__version__,
        root=str(src if src.is_dir() else src.parent),
        backbone=PRECOMPUTED,
        layer=None,
        weights=WeightsRecord(PRECOMPUTED, src.name, digest.hexdigest()),
        preprocess=Preprocess(size=0, resize=0),
        dim=dim,
        metric=metric,
        dtype="float32",
    )
    with writer_lock(index_dir, progress.warn):
        shutil.rmtree(index_dir / STAGING, ignore_errors=True)  # re-reading the files is the resume
        staging = Staging(index_dir, manifest.run_key(), shard_rows)
        staging.open()
        order: list[str] = []
        progress.start(total, 0, f"reading {len(files)} embedding file(s)")
        for f in files:
            for block, names in _blocks(f, column):
                rows = [
                    {"path": n, "label": "", "width": 0, "height": 0, "bytes": 0, "mtime": 0.0, "ctime": 0.0}
                    for n in names
                ]
                staging.add(block, rows, [])
                order += names
                progress.advance(len(block))
        progress.stop()
        done = commit(index_dir, staging, order, manifest, shard_rows, search or SearchConfig(), progress)
    return VectorsReport(index_dir, done.counts.indexed, dim, len(files), done.search_index)
