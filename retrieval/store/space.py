"""Disk space: what a build will write, checked before it starts, and a full disk said in our words."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from retrieval.errors import NoSpaceError
from retrieval.text import format_size

__all__ = ["NoSpaceError", "build_bytes", "check_room", "free_bytes", "is_no_space", "no_space"]

# Per image, beyond its vector: a metadata row (path, label, sizes) and its ledger share.
_ROW_BYTES = 512


def build_bytes(dim: int, to_embed: int, total: int) -> int:
    """Bytes a build writes: the staged shards of the images still to embed, then the generation's
    vector shards and its FAISS file (each a full copy of the vectors), and the metadata."""
    return 4 * dim * (to_embed + 2 * total) + _ROW_BYTES * total


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding `path` (or its nearest existing parent)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def is_no_space(exc: BaseException) -> bool:
    """An OSError that means a full disk or quota, however the writer worded it (numpy says only
    "850944 requested and 624608 written")."""
    if not isinstance(exc, OSError):
        return False
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "requested and" in text and "written" in text


def no_space(index_dir: Path, needed: int, free: int, previous: str | None, before: bool) -> NoSpaceError:
    """The error for a full disk: what happened, how much, that the old index is intact, what to do."""
    what = "does not have room for this build" if before else "ran out of space during this build"
    kept = (
        f"The previous index there ({previous}) is intact and still answers queries."
        if previous
        else "Nothing was committed; there is no earlier index to lose."
    )
    return NoSpaceError(
        f"The device holding {index_dir} {what}: it needs about {format_size(needed)} and "
        f"{format_size(free)} is free. {kept} Free some space and re-run (finished work is resumed), "
        "or give «index» a folder on a disk with more room."
    )


def check_room(index_dir: Path, needed: int, previous: str | None) -> None:
    """Refuse a build that cannot fit before any work is done."""
    free = free_bytes(index_dir)
    if free < needed:
        raise no_space(index_dir, needed, free, previous, before=True)
