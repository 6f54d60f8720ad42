"""User-given paths: `~` expanded where it names a home folder, left alone where it does not."""

from __future__ import annotations

import os
from pathlib import Path


def user_path(path: str | os.PathLike) -> Path:
    """`path` with a leading `~` or `~user` expanded; a file really named `~x.png` stays as it is
    (Path.expanduser raises for an unknown user instead)."""
    p = Path(path)
    try:
        return p.expanduser()
    except RuntimeError:
        return p
