"""CLI: `retrieve info`: what an index holds, its ledger and the history of its commits."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from retrieval.cli._app import command, console, esc
from retrieval.cli._indexes import IndexArg, IndexOpt, open_one
from retrieval.cli._table import search_row


@command("info")
def info_cli(
    index: IndexArg = None,
    index_opt: IndexOpt = None,
    skipped: Annotated[
        bool, typer.Option("--skipped", help="List every skipped file with its reason.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
    history: Annotated[
        bool,
        typer.Option(
            "--history", help="Every commit: indexed, skipped, and what each sync added, changed, removed."
        ),
    ] = False,
) -> None:
    """What an index holds: backbone, weights, preprocessing, counts and skipped files.

    Examples:

      retrieve info                                 # the last index built
      retrieve info ./idx-r8 --skipped              # list every skipped file and why
      retrieve info --history                       # generations, with each sync's changes
      retrieve info ./idx-r8 --json
    """
    from collections import Counter

    from retrieval.text import natural_sorted

    idx = open_one(index, index_opt, announce=False)  # the table names it
    m = idx.manifest
    if as_json:
        console.print_json(json.dumps({**m.to_dict(), "path": str(idx.path)}))
        return
    table = Table(show_header=False, title=esc(idx.path), title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    w = m.weights
    counts = Counter(idx.labels)
    rows = [
        ("root", m.root),
        ("backbone", f"{m.backbone}  {m.dim}-d" + (f"  layer {m.layer}" if m.layer else "")),
        ("weights", _weights_row(w)),
        ("preprocess", ", ".join(f"{k}={v}" for k, v in m.preprocess.to_dict().items())),
        ("metric", m.metric + ("  (mirror-averaged embeddings: --tta)" if m.tta else "")),
        ("images", f"{m.counts.indexed} indexed, {m.counts.skipped} skipped"),
        ("labels", ", ".join(f"{k} ({counts[k]})" for k in natural_sorted(counts)[:20])),
        ("search", search_row(m.search_index)),
        ("generation", f"{m.generation}  committed {m.committed}"),
    ]
    for key, value in rows:
        table.add_row(key, esc(value))
    console.print(table)
    if history:
        _history(m.history)
    ledger = idx.skipped()
    if ledger:
        kinds = Counter(r["reason"].split(":")[0] for r in ledger)
        summary = "skipped: " + ", ".join(f"{n} {k}" for k, n in kinds.most_common())
        console.print(summary, highlight=False, markup=False)
        if skipped:
            for r in ledger:
                console.print(f"  {r['path']}: {r['reason']}", highlight=False, markup=False)


def _weights_row(w) -> str:  # w: retrieval.store.WeightsRecord
    if w.kind == "pixels":
        return "none: raw pixels, no network"
    return f"{w.kind}: {w.id}" + (f"  sha256 {w.sha256[:16]}…" if w.sha256 else "")


def _history(entries: tuple[dict, ...]) -> None:
    """One row per commit, oldest first (a first build or --rebuild has no change counts)."""
    from rich import box

    # Borderless, to the minute, short headers: the table fits 80 columns.
    table = Table(
        title="history",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
        padding=(0, 1, 0, 0),
    )
    table.add_column("generation", no_wrap=True)
    table.add_column("committed", no_wrap=True)
    names = ("indexed", "skipped", "added", "changed", "removed", "renamed")
    for col in names:
        header = {"indexed": "images", "skipped": "ledger", "renamed": "moved"}.get(col, col)
        table.add_column(header, justify="right", min_width=len(header))
    for h in entries:
        when = h.get("committed", "")[:16].replace("T", " ")
        table.add_row(
            esc(h.get("generation", "")), esc(when), *(f"{h[n]:,}" if n in h else "" for n in names)
        )
    console.print(table)
