"""Thumbnails of indexed images and the JPEG sprite atlases that carry them to the page."""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

# Atlases are at most this many pixels on a side: one decode per atlas stays cheap, every browser
# accepts the size as a canvas source and a WebGL texture, and 100k thumbnails need ~25 of them.
ATLAS_SIDE = 2048


def default_thumb_size(n: int) -> int:
    """Larger thumbnails for small sets; 32 px keeps 100k points near 30 MB of HTML."""
    return 64 if n <= 10_000 else 48 if n <= 30_000 else 32


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
