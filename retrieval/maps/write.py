"""Atomic writes of map outputs and cache files."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import IO


def atomic_write_bytes(path: Path, chunks: Iterable[bytes]) -> int:
    """Stream `chunks` into `path` atomically; returns the number of bytes written."""
    from retrieval.atomic import atomic_write

    n = 0

    def write(fh: IO[bytes]) -> None:
        nonlocal n
        for c in chunks:
            n += fh.write(c)

    atomic_write(path, write)
    return n
