"""The `retrieve` command line: thin typer commands over library functions, one module per area."""

from __future__ import annotations

import importlib
import pkgutil

from retrieval.cli._app import app, command, console, err_console

__all__ = ["app", "command", "console", "err_console", "main"]

# Each public module in this package registers its commands on import; discovering them keeps
# the areas (index, train, eval, map, viz...) independent of each other.
for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_mod}")


def main() -> None:
    app()
