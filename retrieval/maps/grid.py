"""Grids: snap projected points to distinct cells (pure) and render them as one PNG of thumbnails."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from retrieval.errors import RetrieveError
from retrieval.maps.write import atomic_write_bytes


def parse_grid(text: str) -> tuple[int, int]:
    """'40x30' -> (40, 30): columns x rows."""
    try:
        w, h = (int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        raise RetrieveError(f"«grid» takes COLUMNSxROWS, e.g. 40x40, not {text!r}") from None
    if w < 1 or h < 1 or w * h > 1_000_000:
        raise RetrieveError(f"«grid» {text}: columns and rows must be >= 1 and at most a million cells")
    return w, h


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
    return atomic_write_bytes(Path(out), [b.getvalue()])
