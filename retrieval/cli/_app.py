"""The typer application, the shared console, and the single place where library errors become exit codes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from retrieval.errors import RetrieveError, as_flags
from retrieval.paths import user_path

app = typer.Typer(
    name="retrieve",
    help=(
        "Turn folders of images into searchable convnet embeddings.\n\n"
        "Start with `retrieve demo` (offline, about 1.5 minutes on 2 CPU cores), or `retrieve index ./images` "
        "then `retrieve query some.jpg`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


class _Console(Console):
    """A console that shows the settings named in library messages («image_size») as flags."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(as_flags(o) if isinstance(o, str) else o for o in objects), **kwargs)


# Results go to stdout; progress, notes and errors go to stderr, so `--json` output stays parseable.
console = _Console()
err_console = _Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def esc(value: object) -> str:
    """User data (paths, labels, messages that quote them) made safe to embed in rich markup.

    A folder named `[red]x` would otherwise be styled away, and `a[/]b.png` raises a MarkupError.
    """
    return escape(str(value))


def exits_cleanly(func: F) -> F:
    """Turn RetrieveError (and Ctrl-C) into one clear line and an exit code instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # `--out=~/x` and quoted "~/x" reach us unexpanded: expand every path argument in one place.
        kwargs = {k: _expand(v) for k, v in kwargs.items()}
        try:
            return func(*args, **kwargs)
        except RetrieveError as exc:
            # The library names settings («image_size»); here they become the flags the user typed.
            err_console.print(f"[bold red]error:[/] {esc(exc.for_cli())}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except BrokenPipeError:  # `retrieve query ... | head`: the reader left; nothing to report
            raise typer.Exit(1) from None
        except OSError as exc:
            # The file system said no (permission, disk full, a folder where a file was expected):
            # the OS message names the path and is the whole story.
            err_console.print(f"[bold red]error:[/] {esc(exc)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _expand(value: Any) -> Any:
    if isinstance(value, Path):
        return user_path(value)
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def command(*args: Any, **kwargs: Any) -> Callable[[F], F]:
    """`app.command` with clean error handling: every command module registers through this."""

    def decorate(func: F) -> F:
        app.command(*args, **kwargs)(exits_cleanly(func))
        return func

    return decorate


def sub_app(name: str, help: str) -> typer.Typer:
    """A command group (e.g. `retrieve viz ...`) whose commands use `exits_cleanly` themselves."""
    group = typer.Typer(help=help, no_args_is_help=True)
    app.add_typer(group, name=name)
    return group
