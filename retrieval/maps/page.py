"""The self-contained HTML map page: its data, the escaping that keeps it inert, and the writer."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import RetrieveError
from retrieval.maps.atlas import atlas_columns
from retrieval.maps.write import atomic_write_bytes

ASSETS = Path(__file__).with_name("assets")


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


def normalise_coords(coords: np.ndarray) -> np.ndarray:
    """Fit into [0, 1]^2 keeping the aspect ratio (the shorter side is centred)."""
    c = np.asarray(coords, dtype=np.float64)
    if len(c) == 0:
        return c.astype(np.float32)
    lo, hi = c.min(axis=0), c.max(axis=0)
    span = float((hi - lo).max()) or 1.0
    return ((c - lo) / span + (1 - (hi - lo) / span) / 2).astype(np.float32)


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
    names, codes = _natural_codes(groups)
    label_names, label_codes = _natural_codes(page.labels)
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


def _natural_codes(values: Sequence[object]) -> tuple[list[str], np.ndarray]:
    """The distinct values in natural order (c2 before c10) and each value's code: the legend and
    the colours follow that order."""
    from retrieval.text import natural_sorted

    text = [str(v) for v in values]
    names = natural_sorted(set(text))
    code_of = {name: i for i, name in enumerate(names)}
    return names, np.array([code_of[t] for t in text], dtype=np.int64)


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
        # file: for the hover preview's original image (the page is itself a local file).
        "img-src data: blob: file:; base-uri 'none'; form-action 'none'"
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

    return atomic_write_bytes(Path(out), chunks())
