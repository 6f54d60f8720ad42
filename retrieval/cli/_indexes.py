"""How every command names the index it reads, and the last index built (remembered by the CLI only).

One vocabulary: each command that reads an index takes `--index / -i` (repeatable where a command
compares spaces), and the commands that always took it as an argument (`info`, `eval`, `map`,
`neighbours`) still do. Neither given: the last index `retrieve index` (or `retrieve demo`) built.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from retrieval.cli._app import err_console, esc
from retrieval.errors import IndexNotFoundError, RetrieveError

if TYPE_CHECKING:
    from retrieval.api import Index

_DEFAULT = "Default: the last index built."
IndexOpt = Annotated[Path | None, typer.Option("--index", "-i", help=f"Index directory. {_DEFAULT}")]
IndexArg = Annotated[Path | None, typer.Argument(help=f"Index directory (or --index). {_DEFAULT}")]
IndexesArg = Annotated[
    list[Path] | None,
    typer.Argument(
        help=f"Index directories, one per space (or --index, repeated). {_DEFAULT}", show_default=False
    ),
]
IndexesOpt = Annotated[
    list[Path] | None,
    typer.Option("--index", "-i", help="Index directory; repeat for several spaces.", show_default=False),
]


def state_dir() -> Path:
    """Where `retrieve` remembers the last index built (RETRIEVE_STATE_DIR overrides)."""
    env = os.environ.get("RETRIEVE_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "retrieve"


def remember_last_index(path: str | os.PathLike) -> None:
    d = state_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        (d / "last-index").write_text(str(Path(path).absolute()) + "\n")
    except OSError:
        pass  # remembering is a convenience; a read-only home must not fail a finished index


def last_index() -> Path:
    f = state_dir() / "last-index"
    if not f.exists():
        raise IndexNotFoundError(
            "No index given and none built yet: run `retrieve index FOLDER` or pass --index."
        )
    path = Path(f.read_text().strip())
    if not (path / "manifest.json").exists():
        raise IndexNotFoundError(
            f"The last index, {path}, no longer exists; pass --index or re-run `retrieve index`."
        )
    return path


def open_one(argument: Path | None = None, option: Path | None = None, announce: bool = True) -> Index:
    """The index named by the argument or by --index (not both), else the last one built; which one
    answers is said on stderr (see `announce`)."""
    from retrieval.api import open_index

    if argument is not None and option is not None and Path(argument) != Path(option):
        raise RetrieveError(f"Two indexes given ({argument} and --index {option}); name one.")
    idx = open_index(argument or option or last_index())
    if announce:
        announce_index(idx)
    return idx


def open_many(arguments: Sequence[Path] | None = None, options: Sequence[Path] | None = None) -> list[Index]:
    """The indexes named as arguments and with --index, in that order, else the last one built."""
    from retrieval.api import open_index

    paths = [*(arguments or []), *(options or [])]
    spaces = [open_index(p) for p in paths] if paths else [open_index(last_index())]
    for idx in spaces:
        announce_index(idx)
    return spaces


def describe_index(idx: Index) -> str:
    """`path (backbone, weights, metric)`, without repeating "pixels" for the pixel baseline."""
    m = idx.manifest
    parts = [m.backbone] if m.backbone == "pixels" else [m.backbone, m.weights.words(full=True)]
    return f"{idx.path} ({', '.join([*parts, m.metric])})"


def announce_index(idx: Index) -> None:
    """Say on stderr which index answers (the last one built is used silently otherwise), and warn
    when its network was never trained: such neighbours say little about what images show."""
    err_console.print(f"[dim]index:[/] {esc(describe_index(idx))}", highlight=False, soft_wrap=True)
    if idx.manifest.weights.kind == "none":
        err_console.print(
            f"[yellow]warning:[/] {esc(idx.path.name)} was built with random weights («weights» none): "
            "its neighbours follow colour and layout, not content. Index with trained weights "
            "(«weights» imagenet or a checkpoint from `retrieve train`) for meaningful results.",
            highlight=False,
            soft_wrap=True,
        )
