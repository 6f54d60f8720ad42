"""Decoding image files in worker processes, where a file that crashes the decoder costs only itself."""

from __future__ import annotations

import faulthandler
import gc
import multiprocessing
import multiprocessing.connection
import pickle
import signal
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from retrieval import errors
from retrieval.errors import BadImageError, RetrieveError
from retrieval.images import ImageFileEntry, Transform, load_tensor

# Batches each loader process decodes ahead of the consumer.
PREFETCH = 4
# What a C decoder's crash looks like from outside (a damaged file in libjpeg, libpng, libtiff,
# libwebp). A process killed otherwise (SIGKILL from the OOM killer, an exit) says nothing about
# the file it held, so no file is blamed for it.
CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT})
# This many crashes in a row is the machine's decoder, not the files: stop rather than skip them all.
MAX_CRASHES_IN_A_ROW = 32
# A file whose process is killed this many times by something other than a crash stops the run.
MAX_UNEXPLAINED_DEATHS = 2


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
    return {"path": e.relpath, "label": e.label, "bytes": e.size, "mtime": e.mtime, "ctime": e.ctime}


class ImageDataset(Dataset):
    """Decode + resize files in loader workers; a failure becomes a ledger entry, not an exception."""

    def __init__(self, entries: Sequence[ImageFileEntry], transform: Transform) -> None:
        self.entries, self.transform = entries, transform

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, dict[str, Any]]:
        e = self.entries[i]
        row = file_row(e)
        try:
            tensor, width, height = load_tensor(e.path, self.transform)
        except BadImageError as exc:
            return None, {**row, "reason": str(exc)}
        return tensor, {**row, "width": width, "height": height}


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


def iter_batches(
    entries: Sequence[ImageFileEntry],
    transform: Transform,
    batch_size: int,
    workers: int,
    pin_memory: bool = False,
) -> Iterator[Batch]:
    """Decoded batches in order, `workers` processes decoding ahead; no protection from crashes."""
    yield from _loader(entries, transform, batch_size, workers, pin_memory)


def _loader(
    entries: Sequence[ImageFileEntry], transform: Transform, batch_size: int, workers: int, pin_memory: bool
) -> DataLoader:
    return DataLoader(
        ImageDataset(entries, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=PREFETCH if workers else None,
        persistent_workers=False,
        worker_init_fn=_child_setup if workers else None,
    )


def decode_all(
    entries: Sequence[ImageFileEntry],
    transform: Transform,
    batch_size: int,
    workers: int,
    consume: Callable[[Batch], None],
    *,
    pin_memory: bool = False,
    wrap: Callable[[Iterator[Batch]], Iterator[Batch]] = lambda it: it,
    warn: Callable[[str], None] = lambda message: None,
) -> None:
    """Hand every file to `consume` in order, in batches; a file that crashes the decoder is skipped.

    A damaged or hostile file can crash a C decoder (libjpeg, libpng, libtiff, libwebp) and kill
    the process decoding it, which no `except` in that process can stop; without this every re-run
    would die at the same file. When a loader process dies, the files it may have held (its
    prefetch window) are decoded again, each range serially in a process of its own so that a
    death names its file exactly; a file that crashes one (a crash signal) is handed over as
    skipped with the reason, and the fast loader resumes after the window.

    DataLoader reports a death from its next batch, or from its SIGCHLD handler, which can raise
    anywhere in the main thread, inside `consume` too. So `consume` may be handed a batch again
    after an interruption part-way (`Batch.start` tells a repeat), and must tolerate that.
    `wrap` sees the batch iterator (to time it). `workers=0` decodes in this process: no protection.
    """
    pos = 0
    while pos < len(entries):
        it = iter(_loader(entries[pos:], transform, batch_size, workers, pin_memory))
        try:
            for batch in wrap(it):
                batch.start = pos
                consume(batch)
                pos += batch.count
            return
        except Exception as exc:
            try:
                death = _death(it, exc)
            except RuntimeError as again:  # the SIGCHLD handler, while we looked: it is the answer
                if not _reports_death(again):
                    raise
                death = errors.first_line(again)
            if death is None:
                raise
        finally:
            _stop(it)
        # Everything the dead loader had asked its processes for: its prefetch, plus one batch.
        end = min(len(entries), pos + batch_size * (PREFETCH * workers + 1))
        warn(
            f"a decoding process died ({death}); decoding the {end - pos} files it may have held "
            "again, one process per range, to find any that crash it"
        )
        for batch in _isolate(entries, pos, end, transform, batch_size, max(1, workers)):
            consume(batch)
            pos = batch.start + batch.count


def _death(it: Any, exc: Exception) -> str | None:
    """How a loader process died, if that is what `exc` means; None for any other error.

    DataLoader words it in two ways ("exited unexpectedly", "is killed by signal: ..."); and a
    process that dies while handing over a batch breaks the transfer itself (EOFError,
    ConnectionResetError) before it can be reaped, so every error is checked against the processes.
    """
    workers = getattr(it, "_workers", None)
    if not workers:
        return None
    deadline = time.monotonic() + (0.0 if _reports_death(exc) else 1.0)
    while True:
        codes = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
        if codes or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    if not codes:
        return None
    return ", ".join(_describe(code) for code in codes)


def _reports_death(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and str(exc).startswith("DataLoader worker (pid")


def _describe(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def _stop(it: Any) -> None:
    """Stop a loader's processes now, not at garbage collection: until then its SIGCHLD handler can
    still raise for a dead one, wherever the main thread is (a shard being written, say)."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is None:
        return
    try:
        shutdown()
    except RuntimeError as exc:  # the handler once more, for the dead one, as the others stop
        if not _reports_death(exc):
            raise


# -- isolation: one range per process, every death attributed --------------------------------------


def _decode_serially(entries: Sequence[ImageFileEntry], transform: Transform, conn: Any) -> None:
    """Child process: decode `entries` in order and send each result as soon as it is made."""
    _child_setup()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    dataset = ImageDataset(entries, transform)
    for i in range(len(dataset)):
        tensor, row = dataset[i]
        conn.send((None if tensor is None else tensor.numpy(), row))
    conn.close()


@dataclass
class _Range:
    """One range of files being decoded serially; `got` holds one result per file, in order."""

    entries: Sequence[ImageFileEntry]
    got: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)
    unexplained: int = 0
    proc: Any = None
    conn: Any = None

    def start(self, context: Any, transform: Transform) -> None:
        recv, send = context.Pipe(duplex=False)
        self.proc = context.Process(
            target=_decode_serially, args=(self.entries[len(self.got) :], transform, send), daemon=True
        )
        self.proc.start()
        send.close()  # the child holds the only writer: its death is our EOF
        self.conn = recv

    def ended(self, context: Any, transform: Transform) -> None:
        """The process stopped sending: finished, or died at the file after the last one sent."""
        self.conn.close()
        self.proc.join()
        code, self.conn = self.proc.exitcode, None
        if len(self.got) == len(self.entries):
            return
        culprit = self.entries[len(self.got)]
        if code is not None and code < 0 and -code in CRASH_SIGNALS:
            reason = f"crashed the image decoder ({_describe(code)})"
            # `crash`: a resumed run decodes it again, in case the machine, not the file, was at fault.
            self.got.append((None, {**file_row(culprit), "reason": reason, "crash": True}))
        else:
            self.unexplained += 1
            if self.unexplained >= MAX_UNEXPLAINED_DEATHS:
                raise RetrieveError(
                    f"The process decoding {culprit.path} was stopped {self.unexplained} times "
                    f"({_describe(code or 0)}), which is not a decoder crash (out of memory? see any "
                    "error printed above). Nothing is lost; run the command again to continue."
                )
        if len(self.got) < len(self.entries):
            self.start(context, transform)

    def stop(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        if self.conn is not None:
            self.conn.close()


def _isolate(
    entries: Sequence[ImageFileEntry],
    pos: int,
    end: int,
    transform: Transform,
    batch_size: int,
    parallel: int,
) -> Iterator[Batch]:
    """Batches of entries[pos:end], each decoded serially in a process of its own, `parallel` at once.

    A process sends each file's result as it is made, so when it dies the file it was on is the
    one after the last it sent; memory holds `parallel` batches.
    """
    context = multiprocessing.get_context()
    crashes_in_a_row = 0
    for round_start in range(pos, end, batch_size * parallel):
        starts = range(round_start, min(end, round_start + batch_size * parallel), batch_size)
        ranges = [_Range(entries[s : min(end, s + batch_size)]) for s in starts]
        try:
            for r in ranges:
                r.start(context, transform)
            while live := {r.conn: r for r in ranges if r.conn is not None}:
                for conn in multiprocessing.connection.wait(list(live)):
                    r = live[conn]
                    try:
                        r.got.append(conn.recv())
                    except (EOFError, OSError, pickle.UnpicklingError):
                        r.ended(context, transform)
        finally:
            for r in ranges:
                r.stop()
        # Nothing is handed over while a process of this round is alive.
        for s, r in zip(starts, ranges, strict=True):
            for _, row in r.got:
                crashes_in_a_row = crashes_in_a_row + 1 if row.get("crash") else 0
                if crashes_in_a_row >= MAX_CRASHES_IN_A_ROW:
                    raise RetrieveError(
                        f"The image decoder crashed on {crashes_in_a_row} files in a row (the last "
                        f"{row['path']}): the machine's image libraries look broken, not the files. "
                        "Nothing was skipped for it; fix the installation and run the command again."
                    )
            good = [torch.from_numpy(a) for a, _ in r.got if a is not None]
            yield Batch(
                torch.stack(good) if good else torch.zeros(0, dtype=torch.uint8),
                [row for a, row in r.got if a is not None],
                [row for a, row in r.got if a is None],
                start=s,
            )
