"""The fast path of `decode_all`: a DataLoader whose worker processes decode files with a Decoder."""

from __future__ import annotations

import faulthandler
import gc
import multiprocessing
import multiprocessing.util
import signal
import sys
import time
import traceback
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from retrieval.errors import BadImageError
from retrieval.images.decode import Decoder, PILDecoder, Transform
from retrieval.images.policy import IsolationPolicy
from retrieval.images.scanning import ImageFileEntry, content_hash

# What a C decoder's crash looks like from outside (a damaged file in libjpeg, libpng, libtiff,
# libwebp). A process killed otherwise (SIGKILL from the OOM killer, an exit) says nothing about
# the file it held, so no file is blamed for it.
CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT})


@dataclass
class Batch:
    """Decoded images of consecutive files, their metadata, and the files that failed."""

    images: torch.Tensor  # uint8 [B, C, H, W]
    rows: list[dict[str, Any]]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    start: int = 0  # position of its first file in what decode_all was given

    @property
    def count(self) -> int:
        return len(self.rows) + len(self.skipped)


def file_row(e: ImageFileEntry) -> dict[str, Any]:
    """The metadata every row has, read or skipped: what the resume key compares."""
    return {
        "path": e.relpath,
        "label": e.label,
        "bytes": e.size,
        "mtime": e.mtime,
        "ctime": e.ctime,
        "inode": e.inode or None,
        "mtime_ns": e.mtime_ns or None,
    }


class ImageDataset(Dataset):
    """Decode + resize files in loader workers; a failure becomes a ledger entry, not an exception."""

    def __init__(
        self, entries: Sequence[ImageFileEntry], transform: Transform, decoder: Decoder = PILDecoder()
    ) -> None:
        self.entries, self.transform, self.decoder = entries, transform, decoder

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, dict[str, Any]]:
        e = self.entries[i]
        row = file_row(e)
        try:
            tensor, width, height = self.decoder.decode(e.path, self.transform)
            # Read again for the hash, from the page cache: ~1% of a decode, and it lets a later
            # sync keep a moved file's vector instead of embedding it again.
            digest = content_hash(e.path)
        except BadImageError as exc:
            return None, {**row, "reason": str(exc)}
        except OSError as exc:  # gone or unreadable between the decode and the hash
            return None, {**row, "reason": f"cannot read: {exc.strerror or exc}"}
        return tensor, {**row, "width": width, "height": height, "hash": digest}


def collate(items: list[tuple[torch.Tensor | None, dict[str, Any]]]) -> Batch:
    good = [(t, r) for t, r in items if t is not None]
    skipped = [r for t, r in items if t is None]
    images = torch.stack([t for t, _ in good]) if good else torch.zeros(0, dtype=torch.uint8)
    return Batch(images, [r for _, r in good], skipped)


def _child_setup(_worker_id: int = 0) -> None:
    """Run first in every decoding process (DataLoader's worker_init_fn, and the isolation child)."""
    # What the parent had left for its garbage collector is the parent's to finalise: collected
    # here, a dropped temporary file was deleted a second time, with a warning per process.
    gc.freeze()
    # DataLoader's own handlers (and faulthandler, when the parent enabled it) print a report before
    # the process dies; decode_all reports the crash itself, by file, so the process dies plainly.
    faulthandler.disable()
    for sig in CRASH_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    sys.excepthook = _quiet_abandoned_transfers


def _quiet_abandoned_transfers(
    exc_type: type[BaseException], exc: BaseException, tb: types.TracebackType | None
) -> None:
    """A batch the parent stopped fetching (it saw another process die) leaves multiprocessing's
    fd-passing thread with a reset connection, which it reports through sys.excepthook: expected."""
    abandoned = issubclass(exc_type, ConnectionError | EOFError) and any(
        frame.filename.endswith("resource_sharer.py") for frame in traceback.extract_tb(tb)
    )
    if not abandoned:
        sys.__excepthook__(exc_type, exc, tb)


def _context() -> Any:
    """fork where it is safe (Linux): a decoding process then starts in milliseconds. Under spawn or
    forkserver (Python 3.14's default) each one imports torch again, seconds per restart, which
    made a folder with ten crashing files take minutes instead of seconds."""
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def _before_fork() -> None:
    # Garbage the parent still holds (a dropped temporary file, a stopped loader's pipes) is
    # finalised here, once, instead of once per child with a warning each. Called once per loader
    # start and once per recovery: a collection takes ~0.5 s in a process holding a million files.
    gc.collect()
    # Children share the parent's multiprocessing temp folder (fd-passing sockets) when it exists
    # first; a child that made its own and then died left it behind in /tmp.
    multiprocessing.util.get_temp_dir()


def _loader(
    entries: Sequence[ImageFileEntry],
    transform: Transform,
    batch_size: int,
    workers: int,
    decoder: Decoder,
    policy: IsolationPolicy,
) -> DataLoader:
    return DataLoader(
        # The decoder travels inside the dataset: inherited by fork, pickled under spawn.
        ImageDataset(entries, transform, decoder),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        # No pin_memory: torch's pinning thread cannot pin a Batch (it has no pin_memory method, so
        # nothing was ever pinned), and a process dying mid-transfer hung that thread's shutdown.
        prefetch_factor=policy.prefetch if workers else None,
        persistent_workers=False,
        worker_init_fn=_child_setup if workers else None,
        multiprocessing_context=_context() if workers else None,
        # Short waits, retried by _patient up to the stall limit (see IsolationPolicy.poll_s).
        timeout=policy.poll_s if workers else 0,
    )


class _Stalled(RuntimeError):
    """No batch from the loader within its stall limit."""


def _patient(it: Any, limit: float) -> Iterator[Batch]:
    """Batches from a loader iterator, waiting up to `limit` seconds for each in poll_s steps.

    A file that makes a decoder loop forever would otherwise hold the run for good: past the limit
    the loader counts as stalled and isolation finds the file (IsolationPolicy.file_timeout_s).
    """
    while True:
        waiting = time.monotonic()
        while True:
            try:
                batch = next(it)
                break
            except StopIteration:
                return
            except RuntimeError as exc:
                if not str(exc).startswith("DataLoader timed out"):
                    raise
                if time.monotonic() - waiting >= limit:
                    raise _Stalled(f"stalled (no batch in {limit:g} s)") from None
        yield batch
