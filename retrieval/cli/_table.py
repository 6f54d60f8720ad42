"""The metrics table laid out for the terminal: the most telling columns first, the rest stacked below.

A table squeezed by rich to 80 columns turns every number into `0.…`. Instead the columns are
measured and, when they do not fit, split into several tables that each fit, every one headed by
the space's name. Numbers are never truncated.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from retrieval.evaluate import SpaceResult


def telling_order(names: Sequence[str]) -> list[str]:
    """Metric names, most telling first: P@10 (or the largest k), MAP@R, mAP, kNN@1, R-precision,
    then the other cut-offs in their usual order."""
    ks = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"P@(\d+)", n)))
    head: list[str] = []
    if ks:
        main = 10 if 10 in ks else ks[-1]
        head = [f"P@{main}", "MAP@R", "mAP", f"kNN@{ks[0]}", "R-precision"]
    first = [n for n in head if n in names]
    return first + [n for n in names if n not in first]


def _table_width(widths: Sequence[int]) -> int:
    # rich's default box: one character of padding either side of each cell and a rule between
    # columns and at both edges.
    return sum(w + 2 for w in widths) + len(widths) + 1


def column_groups(
    names: Sequence[str], widths: dict[str, int], fixed: Sequence[int], width: int | None
) -> list[list[str]]:
    """`names` split, in order, into runs whose table (with the `fixed` leading columns) fits `width`
    characters; each run holds at least one column, and `width=None` keeps them all in one table."""
    if width is None:
        return [list(names)]
    groups: list[list[str]] = [[]]
    for name in names:
        trial = [*fixed, *(widths[n] for n in groups[-1]), widths[name]]
        if groups[-1] and _table_width(trial) > width:
            groups.append([])
        groups[-1].append(name)
    return groups


def layout_width(console: Console) -> int | None:
    """The width to lay the table out for: the terminal's, or COLUMNS when set; piped output is
    not squeezed (one wide table, easy to grep)."""
    if console.is_terminal or os.environ.get("COLUMNS", "").isdigit():
        return console.width
    return None


def print_metrics(
    console: Console, results: Sequence[SpaceResult], caption: str, best: dict[str, list[int]], esc
) -> None:
    """One row per space; the best value of each column in bold green with a star."""
    names = telling_order(list(results[0].metrics))
    cells: dict[str, list[str]] = {}
    for name in names:
        column = []
        for i, r in enumerate(results):
            text = f"{r.metrics[name]:.3f}"
            column.append(text + "*" if i in best[name] and len(results) > 1 else text)
        cells[name] = column
    spaces = [str(r.name) for r in results]
    dims = [str(r.extra.get("dim", "")) for r in results]
    # Terminal cells, not characters: a CJK or emoji space name is two cells a character.
    widths = {n: max(cell_len(n), *(cell_len(c) for c in cells[n])) for n in names}
    fixed = [max(len("space"), *map(cell_len, spaces)), max(len("dim"), *map(cell_len, dims))]
    width = layout_width(console)
    groups = column_groups(names, widths, fixed, width)
    for g, group in enumerate(groups):
        table = Table(
            title=esc(caption) if g == 0 else "(continued)",
            title_justify="left",
            caption="* best in column" if g == len(groups) - 1 and len(results) > 1 else None,
            caption_justify="left",
        )
        table.add_column("space", style="bold", no_wrap=True)
        table.add_column("dim", justify="right", no_wrap=True)
        for name in group:
            table.add_column(name, justify="right", no_wrap=True)
        for i in range(len(results)):
            row = [_mark(cells[n][i]) for n in group]
            table.add_row(esc(spaces[i]), dims[i], *row)
        needed = _table_width([*fixed, *(widths[n] for n in group)])
        # A table wider than the terminal (one very long space name) is printed whole, not squeezed.
        if width is None or needed > width:
            Console(width=needed, highlight=False, file=console.file).print(table)
        else:
            console.print(table)


def _mark(text: str) -> str:
    return f"[bold green]{text}[/]" if text.endswith("*") else text


def search_row(record: dict) -> str:
    """The search index in one line: kind, operating point, measured recall, latency and size."""
    kind = record.get("type", "exact")
    what = "exact (flat)" if kind == "exact" else str(record.get("factory", kind))
    params = record.get("params") or {}
    if params:
        what += " (" + ", ".join(f"{k} {v}" for k, v in params.items()) + ")"
    parts = [what]
    if "recall_at_10" in record:
        parts.append(f"recall@10 {record['recall_at_10']:.3f}")
    if "p50_ms" in record:
        parts.append(f"p50 {record['p50_ms']:.2f} ms, p95 {record.get('p95_ms', float('nan')):.2f} ms")
    if "bytes_per_vector" in record:
        parts.append(f"{record['bytes_per_vector']:,.0f} B/vector")
    return "  ".join(parts)
