"""Pictures for pages: a square thumbnail of an image, and the placeholder for one that is missing."""

from __future__ import annotations

import numpy as np
from PIL import Image


def placeholder(size: int) -> np.ndarray:
    """A grey tile with a cross: what a missing or unreadable image looks like (map, sheet)."""
    from PIL import ImageDraw

    img = Image.new("RGB", (size, size), (205, 205, 205))
    d = ImageDraw.Draw(img)
    m, w = size // 4, max(1, size // 16)
    d.line((m, m, size - m, size - m), fill=(120, 120, 120), width=w)
    d.line((m, size - m, size - m, m), fill=(120, 120, 120), width=w)
    return np.asarray(img)


def square_thumbnail(img: Image.Image, size: int) -> np.ndarray:
    """Centre crop to a square, then a high-quality downscale to size x size RGB."""
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    out = img.convert("RGB").resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=2.0)
    return np.asarray(out)
