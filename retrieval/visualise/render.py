"""Pure array rendering (grids, colour maps, overlays) and the self-contained, escaped HTML report."""

from __future__ import annotations

import base64
import html
import io
import math
import os
import tempfile
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import numpy as np
import torch
from PIL import Image

from retrieval.errors import RetrieveError
from retrieval.preprocess import Preprocess

# Anchors of a perceptually ordered dark-to-bright map (close to matplotlib's "inferno"), so the
# package needs no matplotlib.
_HEAT_ANCHORS = np.array(
    [
        [0.0, 0.0, 4.0],
        [40.0, 11.0, 84.0],
        [101.0, 21.0, 110.0],
        [159.0, 42.0, 99.0],
        [212.0, 72.0, 66.0],
        [245.0, 125.0, 21.0],
        [250.0, 193.0, 39.0],
        [252.0, 255.0, 164.0],
    ]
)


def normalise01(a: np.ndarray, axes: tuple[int, ...] | None = None) -> np.ndarray:
    """Min-max scale to [0, 1] over `axes` (all when None); a constant array becomes zeros."""
    a = np.asarray(a, dtype=np.float32)
    lo = a.min(axis=axes, keepdims=True)
    hi = a.max(axis=axes, keepdims=True)
    span = hi - lo
    return np.where(span > 0, (a - lo) / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)


def tile_grid(
    tiles: np.ndarray, cols: int | None = None, scale: int = 1, pad: int = 1, background: float = 0.0
) -> np.ndarray:
    """Tiles [N, h, w, C] in [0, 1] -> uint8 image [H, W, C] in a grid with `pad` pixels around each.

    cols defaults to ceil(sqrt(N)); each tile is enlarged `scale` times (nearest neighbour, so
    single weights stay visible). H = rows*h*scale + (rows+1)*pad, W likewise.
    """
    if tiles.ndim != 4:
        raise ValueError(f"tiles must be [N, h, w, C], got shape {tiles.shape}")
    n, h, w, c = tiles.shape
    cols = max(1, min(cols or math.ceil(math.sqrt(n)), n))
    rows = math.ceil(n / cols)
    th, tw = h * scale, w * scale
    grid = np.full((rows * th + (rows + 1) * pad, cols * tw + (cols + 1) * pad, c), background, np.float32)
    big = tiles.repeat(scale, axis=1).repeat(scale, axis=2) if scale > 1 else tiles
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = pad + r * (th + pad), pad + col * (tw + pad)
        grid[top : top + th, left : left + tw] = big[i]
    return to_uint8(grid)


def to_uint8(a: np.ndarray) -> np.ndarray:
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def heatmap(m: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> RGB float [H, W, 3] in [0, 1]."""
    m = np.clip(np.asarray(m, dtype=np.float32), 0.0, 1.0)
    xs = np.linspace(0.0, 1.0, len(_HEAT_ANCHORS))
    rgb = [np.interp(m, xs, _HEAT_ANCHORS[:, k]) for k in range(3)]
    return np.stack(rgb, axis=-1).astype(np.float32) / 255.0


def overlay(image: np.ndarray, m: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend a heat map over an image ([H, W, C] in [0, 1], C 1 or 3) where the map is strong."""
    rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
    weight = alpha * np.clip(m, 0.0, 1.0)[..., None]
    return (1.0 - weight) * rgb + weight * heatmap(m)


def denormalise(x: torch.Tensor, pre: Preprocess) -> np.ndarray:
    """A normalised input [C, H, W] back to an image [H, W, C] in [0, 1]."""
    c = x.shape[0]
    mean = torch.tensor(pre.mean[:c], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(pre.std[:c], dtype=torch.float32).view(-1, 1, 1)
    img = x.detach().float().cpu() * std + mean
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


def gradient_image(g: torch.Tensor) -> np.ndarray:
    """An input gradient [C, H, W] shown as an image: zero is mid-grey, +-3 std spans the range."""
    g = g.detach().float().cpu()
    g = (g - g.mean()) / (g.std() + 1e-12)
    return (g * 0.15 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()


def display_scale(side: int, target: int = 128) -> int:
    """Integer enlargement so tiny inputs (28-32 px LeNets) stay legible."""
    return max(1, math.ceil(target / max(side, 1)))


def as_rgb(a: np.ndarray) -> np.ndarray:
    return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """uint8 [H, W, C] (C 1 or 3) -> PNG; parent folders are created."""
    from retrieval.atomic import atomic_write

    path = Path(path)
    arr = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    try:
        # PNG whatever the suffix; zlib level 1: measured 3x faster than PIL's default 6 on saliency
        # panels, for files ~25% larger.
        atomic_write(path, lambda fh: Image.fromarray(arr).save(fh, format="PNG", compress_level=1))
    except OSError as exc:
        raise RetrieveError(f"Cannot write {path}: {exc.strerror or exc}.") from None
    return path


def png_data_uri(image: np.ndarray, max_side: int = 160) -> str:
    """A small PNG thumbnail as a data: URI, so the report needs no other file."""
    arr = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    img = Image.fromarray(arr)
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    elif max(img.size) < max_side // 2:  # a 32 px input: enlarge crisply instead of leaving a speck
        k = max_side // max(img.size)
        img = img.resize((img.width * k, img.height * k), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:4px 8px;vertical-align:middle}
th{text-align:left;background:#f4f4f4}img{image-rendering:pixelated}code{font-size:90%}
.meta{color:#555}
"""


class HtmlReport:
    """A one-file HTML report written row by row (constant memory), escaped, and renamed into place.

    Every text that came from outside (file names, labels, class names, reasons) goes through
    html.escape; images are embedded as data URIs; links are relative and URL-quoted.
    """

    def __init__(
        self, path: str | os.PathLike, title: str, meta: Sequence[tuple[str, str]], columns: Sequence[str]
    ):
        from retrieval.atomic import replace_target

        self.path = replace_target(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        except OSError as exc:
            raise RetrieveError(
                f"Cannot write the report in {self.path.parent}: {exc.strerror or exc}."
            ) from None
        self._tmp = Path(tmp)
        self._fh = os.fdopen(fd, "w", encoding="utf-8")
        self._skipped: list[tuple[str, str]] = []
        self.rows = 0
        e = html.escape
        self._fh.write(
            f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{e(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n<h1>{e(title)}</h1>\n<p class='meta'>"
            + "<br>".join(f"<b>{e(k)}</b>: {e(v)}" for k, v in meta)
            + "</p>\n<table><tr>"
            + "".join(f"<th>{e(c)}</th>" for c in columns)
            + "</tr>\n"
        )

    def add_row(self, cells: Sequence[str | np.ndarray], link: str | None = None) -> None:
        """Text cells are escaped; arrays are embedded as thumbnails; `link` (relative) wraps the last one."""
        parts = []
        for i, cell in enumerate(cells):
            if isinstance(cell, np.ndarray):
                tag = f"<img src='{png_data_uri(cell)}' alt=''>"
                if link is not None and i == len(cells) - 1:
                    href = html.escape(urllib.parse.quote(link), quote=True)
                    tag = f"<a href='{href}'>{tag}</a>"
                parts.append(f"<td>{tag}</td>")
            else:
                parts.append(f"<td>{html.escape(str(cell))}</td>")
        self._fh.write("<tr>" + "".join(parts) + "</tr>\n")
        self.rows += 1

    def add_skipped(self, relpath: str, reason: str) -> None:
        self._skipped.append((relpath, reason))

    def close(self) -> Path:
        e = html.escape
        self._fh.write("</table>\n")
        if self._skipped:
            self._fh.write(f"<h2>Skipped ({len(self._skipped)})</h2>\n<ul>\n")
            for rel, reason in self._skipped:
                self._fh.write(f"<li><code>{e(rel)}</code>: {e(reason)}</li>\n")
            self._fh.write("</ul>\n")
        self._fh.write("</body></html>\n")
        self._fh.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> HtmlReport:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
