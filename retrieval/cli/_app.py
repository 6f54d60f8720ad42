"""The typer application, the shared console, and the single place where library errors become exit codes."""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

# typer 0.29 carries its own click: its exceptions are the ones its parser raises.
from typer import _click as click
from typer._click.exceptions import NoSuchOption, UsageError
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from retrieval.errors import RetrieveError, as_flags
from retrieval.paths import user_path


def reflow(text: str | None) -> str | None:
    """Help text with its paragraphs re-joined: docstrings are wrapped at 100 columns in the source,
    and rich would keep those breaks and print ragged lines. Indented blocks (examples) stay as they
    are, one line each."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    out = []
    for para in paragraphs:
        lines = para.splitlines()
        if any(line.startswith(" ") for line in lines):
            out.append(para)  # rich keeps the line breaks of a paragraph
        else:
            out.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(out)


# "Default: X." or "(default: X)" in an option's help, whoever wrote it: shown as typer's own
# "[default: X]", so the pages have one style of default.
_DEFAULT_TEXT = re.compile(r"\s*(?:\(default:? (?P<a>[^)]*)\)|Default: (?P<b>.*?))\.?\s*$")
_METAVARS = {"int": "N", "float": "X", "Path": "PATH", "str": "TEXT"}


def tidy_param(param: click.Parameter) -> None:
    """One look for every option: flags show no `<bool>`, values a short metavar (`N`, `PATH`),
    arguments their name alone, defaults as `[default: ...]`."""
    if param.metavar is None:
        if isinstance(param, TyperOption) and param.is_flag:
            param.metavar = ""
        elif isinstance(param, TyperArgument):
            # The name says what goes there (IMAGES, FOLDER); the `<list[Path]>` beside it adds nothing.
            param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]
        elif isinstance(param, TyperOption) and not param.type_descriptor.is_choice:
            bare = param.bare_type().removeprefix("list[").removesuffix("]")
            param.metavar = _METAVARS.get(bare, bare.upper())
    help_text = getattr(param, "help", None)
    if help_text and (m := _DEFAULT_TEXT.search(help_text)):
        param.help = help_text[: m.start()].rstrip()
        if param.help and not param.help.endswith((".", "?", ")")):
            param.help += "."
        param.show_default = (m.group("a") or m.group("b")).strip()


class _TidyParams:
    """Mixed into typer's command and group classes: their parameters tidied as they are listed."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            tidy_param(param)
        return params


# Long options that read as short ones, renamed for issue 21 (`--k` -> `-k/--top-k` and the like):
# an old command line is answered with the new name, not a bare "No such option".
_RENAMED = {"--k": "-k", "--n": "-n"}


class _Command(_TidyParams, TyperCommand):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except NoSuchOption as exc:
            short = _RENAMED.get(exc.option_name)
            now = next((p.opts for p in self.params if short and short in p.opts), None)
            if now is None:
                raise
            raise UsageError(f"{exc.option_name} was renamed: use {' or '.join(now)}.", ctx) from None


class _Group(_TidyParams, TyperGroup):
    pass


class _Typer(typer.Typer):
    """Commands registered on it (and on its sub-apps) get the tidied help and reflowed docstrings."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[F], F]:
        def decorate(func: F) -> F:
            kwargs.setdefault("cls", _Command)
            kwargs.setdefault("help", reflow(func.__doc__))
            return super(_Typer, self).command(*args, **kwargs)(func)

        return decorate


app = _Typer(
    cls=_Group,
    name="retrieve",
    help=(
        "Turn folders of images into searchable convnet embeddings.\n\n"
        "Start with `retrieve demo` (offline, about 2.5 minutes on 2 CPU cores), or `retrieve index ./images` "
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
        kwargs.setdefault("help", reflow(func.__doc__))
        app.command(*args, **kwargs)(exits_cleanly(func))
        return func

    return decorate


def sub_app(name: str, help: str) -> typer.Typer:
    """A command group (e.g. `retrieve viz ...`) whose commands use `exits_cleanly` themselves."""
    group = _Typer(cls=_Group, help=reflow(help), no_args_is_help=True)
    app.add_typer(group, name=name)
    return group
