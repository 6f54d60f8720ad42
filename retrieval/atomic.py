"""Atomic file writes: write beside the target, fsync, rename; a killed process never leaves half a file."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from retrieval.errors import RetrieveError
from retrieval.paths import user_path


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which is not thread-safe.
_UMASK = _read_umask()


def replace_target(path: str | os.PathLike) -> Path:
    """The file that writing `path` by rename should replace, or a RetrieveError.

    A symlink is written through (its target is replaced, the link stays). Anything else that is not
    a regular file (a folder, a device such as /dev/null, a FIFO) is refused: renaming over it would
    replace the device or pipe with a plain file.
    """
    path = user_path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return path  # a new file (a parent that is a file fails where the folder is made)
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise RetrieveError(f"Cannot write {path}: it is {kind}; give a file path to write to.")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write(fileobj)` on a temporary file in the target's folder, then `os.replace` it."""
    path = replace_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RetrieveError(
            f"Cannot write {path}: a part of {path.parent} is a file, not a folder."
        ) from None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the mode `open()` would (0666 less the umask), so
        # pages, indexes and checkpoints are as shareable as any other file the user writes.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_dir(path.parent)
    return path


def sync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable: without it, a power cut after `os.replace` may leave the
    old name (a process kill never does). No-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """`obj` as indented JSON, atomically."""
    atomic_write(path, lambda fh: fh.write((json.dumps(obj, indent=2) + "\n").encode()))
