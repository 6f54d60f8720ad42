"""One writer per index folder: an advisory flock on `.lock`, dropped by the kernel when its holder dies."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from retrieval.errors import IndexFormatError, RetrieveError

LOCK = ".lock"


@contextlib.contextmanager
def writer_lock(index_dir: Path, warn: Callable[[str], None] = lambda message: None) -> Iterator[None]:
    """Hold the index folder's write lock, or fail at once if another run holds it.

    Two runs on one folder share `.staging/` and delete it under each other at commit, so the
    second one must not start. The lock is an advisory `flock` on `.lock`: the kernel drops it when
    its holder dies, so a killed run never leaves the folder locked. Where the file system refuses
    locks (some NFS mounts), the run goes on unlocked and `warn` says so.
    """
    if index_dir.exists() and not index_dir.is_dir():
        raise IndexFormatError(f"{index_dir} is a file, not an index folder; choose another «index».")
    created = not index_dir.exists()
    # The folders this run makes (`./indexes/` for the default index path too), outermost last.
    made = [index_dir, *(p for p in index_dir.parents if not p.exists())] if created else []
    index_dir.mkdir(parents=True, exist_ok=True)
    with _flock(index_dir / LOCK, warn):
        try:
            yield
        finally:
            # A run that failed before writing anything (a bad --backbone, say) leaves no empty
            # folder; removed while the lock is held, so no other run can be inside it.
            if created and {p.name for p in index_dir.iterdir()} <= {LOCK}:
                shutil.rmtree(index_dir, ignore_errors=True)
                for parent in made[1:]:
                    try:
                        parent.rmdir()  # only while empty: another run may have put work there
                    except OSError:
                        break


@contextlib.contextmanager
def _flock(path: Path, warn: Callable[[str], None]) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks, the caller is trusted to run one job
        yield
        return
    index_dir = path.parent
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise RetrieveError(
                f"Another `retrieve index` (pid {holder}) is writing to {index_dir}; wait for it to "
                "finish, or write to another «index»."
            ) from None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: a file system without locks, not another run
            unlockable = exc.strerror or str(exc)
        else:
            unlockable = None
        if unlockable is not None:
            warn(
                f"{index_dir} cannot be locked ({unlockable}; a network file system?): going on "
                "without the lock, so do not start a second `retrieve index` on it meanwhile."
            )
            yield
            return
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
