"""The neighbours sheet: for each query, one row per space (query, then its k nearest), as HTML and PNG."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retrieval.errors import RetrieveError

if TYPE_CHECKING:
    from PIL import Image

    from retrieval.api import Index
    from retrieval.evaluate import QuerySet

THUMB = 96  # px, side of each square thumbnail


@dataclass(frozen=True)
class Cell:
    """One image on the sheet."""

    file: Path  # absolute path of the image, for the thumbnail
    name: str  # shown: path relative to its root
    label: str
    distance: float | None = None  # None for the query itself
    wrong: bool = False  # a neighbour whose label differs from the query's


@dataclass(frozen=True)
class SpaceRow:
    """A query's neighbours in one space."""

    space: str
    query: Cell
    neighbours: tuple[Cell, ...]


@dataclass(frozen=True)
class QueryBlock:
    """Everything shown for one query: a row per space."""

    query: Cell
    rows: tuple[SpaceRow, ...]


def pick_queries(labels: Sequence[str], n: int, seed: int = 0) -> list[int]:
    """`n` positions spread evenly over the labels, seeded: each round draws one image from every
    label still holding one, and a last partial round draws its labels at random, so with 17
    classes and n=8 the seed decides which 8 classes show (not always the first 8 in text order)."""
    from retrieval.text import natural_sorted

    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    order = natural_sorted(by_label)
    queues = {lab: [int(i) for i in rng.permutation(by_label[lab])] for lab in order}
    picked: list[int] = []
    while len(picked) < min(n, len(labels)):
        live = [lab for lab in order if queues[lab]]
        room = n - len(picked)
        if room < len(live):  # the partial round: which labels, at random; shown in label order
            keep = set(rng.choice(len(live), room, replace=False).tolist())
            live = [lab for j, lab in enumerate(live) if j in keep]
        picked.extend(queues[lab].pop(0) for lab in live)
    return picked


def neighbour_blocks(
    indexes: Sequence[Index],
    queries: Sequence[QuerySet] | None,
    query_root: Path | None,
    n: int = 8,
    k: int = 5,
    seed: int = 0,
) -> list[QueryBlock]:
    """The sheet's content: `n` queries (from `queries`, or leave-one-out from the first index) and
    their `k` nearest neighbours in each index, found by exact search."""
    from retrieval.evaluate import exact_neighbours

    if not indexes:
        raise RetrieveError("Give at least one index.")
    first = indexes[0]
    if queries is None:
        labels, names = first.labels, first.paths
        files = [first.root / p for p in names]
    else:
        assert query_root is not None
        labels, names = queries[0].labels, queries[0].paths
        files = [query_root / p for p in names]
    chosen = pick_queries(labels, n, seed)
    space_names = _space_names(indexes)
    per_space: list[list[SpaceRow]] = [[] for _ in chosen]
    for s, index in enumerate(indexes):
        vectors = np.asarray(index.vectors(), np.float32)
        if queries is None:
            # The same images in every space (checked by the caller), found by path: ids may differ.
            ids_here = np.array([index.id_of(names[c]) for c in chosen])
            dist, ids = exact_neighbours(vectors, vectors[ids_here], k + 1, index.metric)
            keep = ids != ids_here[:, None]
            keep[~(~keep).any(axis=1), -1] = False
            keep &= np.cumsum(keep, axis=1) <= k
            dist = np.array([d[m] for d, m in zip(dist, keep, strict=True)])
            ids = np.array([i[m] for i, m in zip(ids, keep, strict=True)])
        else:
            dist, ids = exact_neighbours(vectors, queries[s].vectors[chosen], k, index.metric)
        name = space_names[s]
        for row, c in enumerate(chosen):
            q = Cell(files[c], names[c], labels[c])
            cells = tuple(
                Cell(
                    index.root / index.paths[j],
                    index.paths[j],
                    index.labels[j],
                    float(d),
                    index.labels[j] != labels[c],
                )
                for j, d in zip(ids[row], dist[row], strict=True)
                if j >= 0
            )
            per_space[row].append(SpaceRow(name, q, cells))
    return [QueryBlock(rows[0].query, tuple(rows)) for rows in per_space]


def _space_names(indexes: Sequence[Index]) -> list[str]:
    """A row's name says the space: the backbone and its weights ("pixels", "lenet · best.pt",
    "resnet18 · ImageNet"), with the index folder added where two would read the same."""
    names = [
        "pixels" if m.backbone == "pixels" else f"{m.backbone} · {m.weights.words()}"
        for m in (index.manifest for index in indexes)
    ]
    named = [
        f"{name} ({index.path.name})" if names.count(name) > 1 else name
        for name, index in zip(names, indexes, strict=True)
    ]
    # Two folders of one name (a/idx, b/idx): the whole path tells them apart.
    return [
        f"{name} ({index.path})" if named.count(label) > 1 else label
        for name, label, index in zip(names, named, indexes, strict=True)
    ]


def distance_format(values: Sequence[float]) -> str:
    """One format for every distance on a sheet: three significant digits for the largest, the
    same decimals for the rest (9.5, 10.1, 14.0 rather than 9.46, 10.1, 14); one per space."""
    finite = [abs(v) for v in values if np.isfinite(v)]
    top = max(finite, default=0.0)
    # At most four decimals: near-duplicates at 1e-7 read "0.0000", not nine digits of noise.
    decimals = 3 if top == 0 else min(4, max(0, 2 - int(np.floor(np.log10(top)))))
    return f"{{:.{decimals}f}}"


LEGEND = (
    "Each row: the query (blue), then its nearest neighbours in one space, nearest first, with label "
    "and distance. A red outline marks a neighbour whose label differs from the query's."
)


def same_label(row: SpaceRow) -> str:
    """ "4/5 same label": the row's precision, in words."""
    wrong = sum(c.wrong for c in row.neighbours)
    return f"{len(row.neighbours) - wrong}/{len(row.neighbours)} same label"


def _distances(blocks: Sequence[QueryBlock]) -> dict[str, str]:
    """The distance format of each space (spaces differ in scale: pixels ~10, a network ~0.1)."""
    values: dict[str, list[float]] = {}
    for b in blocks:
        for r in b.rows:
            values.setdefault(r.space, []).extend(c.distance for c in r.neighbours if c.distance is not None)
    return {space: distance_format(v) for space, v in values.items()}


# --------------------------------------------------------------------------------------------
# Thumbnails


def thumbnail(file: Path, size: int = THUMB) -> Image.Image:
    """A centre-cropped square RGB thumbnail, or the grey placeholder tile when the file is unreadable."""
    from PIL import Image

    from retrieval.errors import BadImageError
    from retrieval.images import open_image, placeholder, square_thumbnail

    try:
        return Image.fromarray(square_thumbnail(open_image(file), size))
    except (BadImageError, OSError):
        return Image.fromarray(placeholder(size))


def _data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font: 13px/1.35 system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 18px; } .legend { color: #555; margin-bottom: 12px; }
.block { margin: 14px 0 20px; border-top: 1px solid #ddd; padding-top: 8px; }
.block h2 { font-size: 14px; margin: 0 0 6px; font-weight: 600; }
.row { display: flex; align-items: flex-start; gap: 6px; margin: 4px 0; }
.space { width: 150px; flex: none; font-weight: 600; padding-top: 36px; word-break: break-all; }
figure { margin: 0; width: 100px; text-align: center; }
figure img { width: 96px; height: 96px; border: 2px solid transparent; display: block; margin: 0 auto; }
figure.query img { border-color: #2a6fdb; }
figure.wrong img { border-color: #d62728; outline: 2px solid #d62728; }
figcaption { font-size: 11px; } figcaption .name { overflow-wrap: normal; word-break: keep-all; }
figcaption .label { font-weight: 600; } figure.wrong .label { color: #d62728; }
"""


def render_html(blocks: Sequence[QueryBlock], title: str = "Nearest neighbours", note: str = "") -> str:
    """A self-contained page (thumbnails embedded as data URIs); every name and label is escaped."""
    esc = html.escape
    cache: dict[Path, str] = {}

    def uri(cell: Cell) -> str:
        if cell.file not in cache:
            cache[cell.file] = _data_uri(thumbnail(cell.file))
        return cache[cell.file]

    fmt = _distances(blocks)

    def breakable(name: str) -> str:
        # Long paths may break after a folder, never inside a name or its extension.
        return "/<wbr>".join(esc(part) for part in name.split("/"))

    def figure(cell: Cell, kind: str, space: str) -> str:
        dist = "query" if cell.distance is None else f"d = {fmt[space].format(cell.distance)}"
        return (
            f'<figure class="{kind}"><img src="{uri(cell)}" alt="{esc(cell.name)}" title="{esc(cell.name)}">'
            f'<figcaption><span class="label">{esc(cell.label)}</span><br>{esc(dist)}'
            f'<br><span class="name">{breakable(cell.name)}</span></figcaption></figure>'
        )

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="legend">{esc(LEGEND)}{(" " + esc(note)) if note else ""}</p>',
    ]
    for block in blocks:
        parts.append('<section class="block">')
        parts.append(f"<h2>{esc(block.query.name)} <small>({esc(block.query.label)})</small></h2>")
        for row in block.rows:
            parts.append(
                f'<div class="row"><div class="space">{esc(row.space)}<br><small>{same_label(row)}</small></div>'
            )
            parts.append(figure(row.query, "query", row.space))
            parts.extend(figure(c, "wrong" if c.wrong else "hit", row.space) for c in row.neighbours)
            parts.append("</div>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# PNG


def name_lines(name: str, fits: Callable[[str], bool]) -> list[str]:
    """A row's space name on one line, or split before its weights ("efficientnet_lite0",
    "· ImageNet") when one line does not fit: cut at the front, the backbone's name was lost."""
    head, sep, tail = name.partition(" · ")
    return [name] if fits(name) or not sep else [head, f"· {tail}"]


def render_png(
    blocks: Sequence[QueryBlock], title: str = "Nearest neighbours", note: str = ""
) -> Image.Image:
    """The same sheet as one image that stands alone on a slide: the title and the legend, a header
    line per query, a row per space with its "4/5 same label", every distance in one format."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    bold = ImageFont.load_default(size=13)
    pad, cell_w, caption_h, label_w, header_h = 6, THUMB + 8, 30, 170, 22
    k = max((len(r.neighbours) for b in blocks for r in b.rows), default=0)
    width = max(label_w + (k + 1) * cell_w + 2 * pad, 520)
    legend = textwrap.wrap(LEGEND + (" " + note if note else ""), width=max(40, (width - 2 * pad) // 6))
    top = 30 + 15 * len(legend) + pad
    row_h = THUMB + 8 + caption_h
    height = top + sum(header_h + len(b.rows) * row_h + pad for b in blocks) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, pad), title, fill=(20, 20, 20), font=bold)
    for i, line in enumerate(legend):
        draw.text((pad, 28 + 15 * i), line, fill=(85, 85, 85), font=font)
    thumbs: dict[Path, Image.Image] = {}
    fmt = _distances(blocks)

    def fit(text: str, room: int, f: ImageFont.ImageFont) -> str:
        # Cut at the front (the end of a path says most), and never inside the extension.
        if draw.textlength(text, font=f) <= room:
            return text
        while text and draw.textlength("…" + text, font=f) > room:
            text = text[1:]
        return "…" + text

    def put(cell: Cell, x: int, y: int, colour: tuple[int, int, int] | None, space: str) -> None:
        if cell.file not in thumbs:
            thumbs[cell.file] = thumbnail(cell.file)
        if colour is not None:
            draw.rectangle((x, y, x + THUMB + 5, y + THUMB + 5), outline=colour, width=3)
        sheet.paste(thumbs[cell.file], (x + 3, y + 3))
        dist = "query" if cell.distance is None else fmt[space].format(cell.distance)
        draw.text(
            (x + 2, y + THUMB + 8), fit(cell.label, cell_w - 4, font), fill=colour or (20, 20, 20), font=font
        )
        draw.text((x + 2, y + THUMB + 20), dist, fill=(90, 90, 90), font=font)

    y = top
    for block in blocks:
        draw.text(
            (pad, y + 4),
            fit(f"{block.query.name} ({block.query.label})", width - 2 * pad, bold),
            fill=(20, 20, 20),
            font=bold,
        )
        y += header_h
        for row in block.rows:
            room = label_w - 2 * pad
            lines = name_lines(row.space, lambda t, room=room: draw.textlength(t, font=bold) <= room)
            shift = 8 * (len(lines) - 1)
            for j, line in enumerate(lines):
                draw.text(
                    (pad, y + THUMB // 2 - 8 - shift + 16 * j),
                    fit(line, room, bold),
                    fill=(20, 20, 20),
                    font=bold,
                )
            draw.text((pad, y + THUMB // 2 + 8 + shift), same_label(row), fill=(85, 85, 85), font=font)
            x = label_w
            put(row.query, x, y, (42, 111, 219), row.space)
            for cell in row.neighbours:
                x += cell_w
                put(cell, x, y, (214, 39, 40) if cell.wrong else None, row.space)
            y += row_h
        y += pad
    return sheet


def write_sheet(
    blocks: Sequence[QueryBlock], out: str | os.PathLike, title: str = "Nearest neighbours", note: str = ""
) -> tuple[Path, Path]:
    """Write `out` (HTML) and the same name with .png, atomically; returns both paths."""
    from retrieval.atomic import atomic_write

    out = Path(out)
    if out.suffix.lower() == ".png":  # the PNG beside it would overwrite the page
        raise RetrieveError(
            f"the sheet is an HTML page with a PNG written beside it; name it .html, not {out}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    page = render_html(blocks, title, note).encode("utf-8")
    atomic_write(out, lambda fh: fh.write(page))
    image = render_png(blocks, title, note)
    atomic_write(png, lambda fh: image.save(fh, format="PNG"))
    return out, png
