"""Decoding image files in worker processes, where a file that crashes the decoder costs only itself."""

from __future__ import annotations

import faulthandler
import gc
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
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
# No batch from the loader for this long, per file in a batch (at least STALL_MIN_S): a decoder is
# stuck in a loop, and isolation finds the file. A batch is one process's work, file after file.
STALL_PER_FILE_S = 5.0
STALL_MIN_S = 120.0
# DataLoader checks for dead processes only between timed waits for a batch: wait in short ones.
POLL_S = 5.0
# No result for one file for this long, twice, in isolation: that file hangs the decoder and is skipped.
FILE_TIMEOUT_S = 60.0


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
    entries: Sequence[ImageFileEntry], transform: Transform, batch_size: int, workers: int
) -> DataLoader:
    return DataLoader(
        ImageDataset(entries, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        # No pin_memory: torch's pinning thread cannot pin a Batch (it has no pin_memory method, so
        # nothing was ever pinned), and a process dying mid-transfer hung that thread's shutdown.
        prefetch_factor=PREFETCH if workers else None,
        persistent_workers=False,
        worker_init_fn=_child_setup if workers else None,
        multiprocessing_context=_context() if workers else None,
        # Short waits, retried by _patient up to the stall limit (see POLL_S).
        timeout=POLL_S if workers else 0,
    )


class _Stalled(RuntimeError):
    """No batch from the loader within its stall limit."""


def _patient(it: Any, limit: float) -> Iterator[Batch]:
    """Batches from a loader iterator, waiting up to `limit` seconds for each in POLL_S steps.

    A file that makes a decoder loop forever would otherwise hold the run for good: past the limit
    the loader counts as stalled and isolation finds the file (FILE_TIMEOUT_S).
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


def decode_all(
    entries: Sequence[ImageFileEntry],
    transform: Transform,
    batch_size: int,
    workers: int,
    consume: Callable[[Batch], None],
    *,
    wrap: Callable[[Iterator[Batch]], Iterator[Batch]] = lambda it: it,
    warn: Callable[[str], None] = lambda message: None,
) -> None:
    """Hand every file to `consume` in order, in batches; a file that crashes the decoder is skipped.

    A damaged or hostile file can crash a C decoder (libjpeg, libpng, libtiff, libwebp) and kill
    the process decoding it, which no `except` in that process can stop; without this every re-run
    would die at the same file. When a loader process dies (or the loader stalls), the files it may
    have held (its prefetch window) are decoded again, each range serially in a process of its own
    so that a death names its file exactly; a file that crashes one (a crash signal) or hangs it is
    handed over as skipped with the reason, and the fast loader resumes after the window.

    DataLoader reports a death from its next batch, or from its SIGCHLD handler, which can raise
    anywhere in the main thread, inside `consume` too. So `consume` may be handed a batch again
    after an interruption part-way (`Batch.start` tells a repeat), and must tolerate that.
    `wrap` sees the batch iterator (to time it). `workers=0` decodes in this process: no protection.
    """
    pos = 0
    streak = _Streak()
    stall = max(STALL_MIN_S, STALL_PER_FILE_S * batch_size)
    if workers:
        _before_fork()
    while pos < len(entries):
        it = iter(_loader(entries[pos:], transform, batch_size, workers))
        try:
            for batch in wrap(_patient(it, stall) if workers else it):
                batch.start = pos
                streak.saw_good(batch.count)
                consume(batch)
                pos += batch.count
            return
        except Exception as exc:
            try:
                death = _death(it, exc)
            except RuntimeError as again:  # the SIGCHLD handler, while we looked: it is the answer
                if not _reports_death(again):
                    raise
                death = f"died ({errors.first_line(again).rstrip(' .')})"
            if death is None:
                raise
        finally:
            _stop(it)
            it = None
        _before_fork()  # the stopped loader's pipes are finalised here, not in the next children
        # Everything the dead loader had asked its processes for: its prefetch, plus one batch.
        end = min(len(entries), pos + batch_size * (PREFETCH * workers + 1))
        warn(
            f"a decoding process {death}; decoding the {end - pos} files it may have held again, "
            "one process per range, to find any that crash it"
        )
        for batch in _isolate(entries, pos, end, transform, batch_size, max(1, workers), streak):
            consume(batch)
            pos = batch.start + batch.count


def _death(it: Any, exc: Exception) -> str | None:
    """How a loader process died or stalled, if that is what `exc` means; None for any other error.

    DataLoader words a death in two ways ("exited unexpectedly", "is killed by signal: ..."); and a
    process that dies while handing over a batch breaks the transfer itself (EOFError,
    ConnectionResetError) before it can be reaped, so every error is checked against the processes.
    """
    workers = getattr(it, "_workers", None)
    if not workers:
        return None
    if isinstance(exc, _Stalled):
        return str(exc)
    deadline = time.monotonic() + (0.0 if _reports_death(exc) else 1.0)
    while True:
        codes = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
        if codes or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    if not codes:
        return f"died ({errors.first_line(exc).rstrip(' .')})" if _reports_death(exc) else None
    return f"died ({', '.join(_describe(code) for code in codes)})"


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


class _Streak:
    """Files in a row that crashed the decoder, across windows: many is the machine, not the files."""

    def __init__(self) -> None:
        self.crashes = 0

    def saw_good(self, n: int) -> None:
        if n:
            self.crashes = 0

    def saw(self, row: dict[str, Any]) -> None:
        self.crashes = self.crashes + 1 if row.get("crash") else 0
        if self.crashes >= MAX_CRASHES_IN_A_ROW:
            raise RetrieveError(
                f"The image decoder crashed on {self.crashes} files in a row (the last {row['path']}): "
                "the machine's image libraries look broken, not the files. Nothing was skipped for "
                "it; fix the installation and run the command again."
            )


def _decode_serially(entries: Sequence[ImageFileEntry], transform: Transform, conn: Any) -> None:
    """Child process: decode `entries` in order and send each result as soon as it is made."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _child_setup()
    dataset = ImageDataset(entries, transform)
    for i in range(len(dataset)):
        try:
            tensor, row = dataset[i]
        except Exception as exc:  # a bug, not a bad file (those are rows): the parent raises it
            conn.send(("error", f"decoding {entries[i].path} failed: {type(exc).__name__}: {exc}"))
            break
        conn.send(("ok", None if tensor is None else tensor.numpy(), row))
    conn.close()


@dataclass
class _Range:
    """One range of files being decoded serially; `got` holds one result per file, in order."""

    entries: Sequence[ImageFileEntry]
    got: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)
    unexplained: int = 0  # deaths that blame no file, at position `unexplained_at`
    unexplained_at: int = -1
    hung_at: int = -1  # the position of a file that already hung once
    proc: Any = None
    conn: Any = None
    since: float = 0.0  # when the file it is on was started

    def start(self, context: Any, transform: Transform) -> None:
        recv, send = context.Pipe(duplex=False)
        self.proc = context.Process(
            target=_decode_serially, args=(self.entries[len(self.got) :], transform, send), daemon=True
        )
        self.proc.start()
        send.close()  # the child holds the only writer: its death is our EOF
        self.conn, self.since = recv, time.monotonic()

    def receive(self) -> bool:
        """Take one message; False when the process has stopped sending (finished, or died)."""
        try:
            message = self.conn.recv()
        except (EOFError, OSError, pickle.UnpicklingError):
            return False
        if message[0] == "error":
            raise RetrieveError(message[1])
        self.got.append(message[1:])
        self.since = time.monotonic()
        return True

    def overdue(self, now: float) -> bool:
        # poll: a result that arrived just now is taken on the next pass, not killed as a hang.
        return self.conn is not None and now - self.since > FILE_TIMEOUT_S and not self.conn.poll(0)

    def ended(self, hung: bool = False) -> bool:
        """The process stopped (or is stopped, `hung`): finished, or lost at the file after the last
        one sent. Returns whether files are left to decode (in a new process)."""
        if hung:
            self.proc.kill()
        self.conn.close()
        self.proc.join(timeout=5.0)
        if self.proc.is_alive():  # it stopped sending (a broken pipe) yet lives: it cannot go on
            self.proc.kill()
            self.proc.join()
        code, self.conn = self.proc.exitcode, None
        if len(self.got) == len(self.entries):
            return False
        culprit = self.entries[len(self.got)]
        if hung and self.hung_at != len(self.got):
            # Once is not proof: a process forked while another thread held a lock (stderr, say)
            # can stall on its first write. The file is tried again in a fresh process first.
            self.hung_at = len(self.got)
            return True
        if hung or (code is not None and code < 0 and -code in CRASH_SIGNALS):
            why = f"no result in {FILE_TIMEOUT_S:g} s" if hung else _describe(code)
            reason = f"{'hung' if hung else 'crashed'} the image decoder ({why})"
            # `crash`: a resumed run decodes it again, in case the machine, not the file, was at fault.
            self.got.append((None, {**file_row(culprit), "reason": reason, "crash": True}))
        else:
            at = len(self.got)
            self.unexplained = self.unexplained + 1 if at == self.unexplained_at else 1
            self.unexplained_at = at
            if self.unexplained >= MAX_UNEXPLAINED_DEATHS:
                raise RetrieveError(
                    f"The process decoding {culprit.path} was stopped {self.unexplained} times "
                    f"({_describe(code or 0)}), which is not a decoder crash (out of memory? see any "
                    "error printed above). Nothing is lost; run the command again to continue."
                )
        return len(self.got) < len(self.entries)

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
    streak: _Streak,
) -> Iterator[Batch]:
    """Batches of entries[pos:end], each decoded serially in a process of its own, `parallel` at once.

    A process sends each file's result as it is made, so when it dies the file it was on is the
    one after the last it sent; memory holds `parallel` batches.
    """
    context = _context()
    for round_start in range(pos, end, batch_size * parallel):
        starts = range(round_start, min(end, round_start + batch_size * parallel), batch_size)
        ranges = [_Range(entries[s : min(end, s + batch_size)]) for s in starts]
        try:
            for r in ranges:
                r.start(context, transform)
            while live := {r.conn: r for r in ranges if r.conn is not None}:
                ready = multiprocessing.connection.wait(list(live), timeout=1.0)
                restart = [r for r in (live[c] for c in ready) if not r.receive() and r.ended()]
                now = time.monotonic()
                restart += [r for r in live.values() if r.overdue(now) and r.ended(hung=True)]
                for r in restart:  # outside any `except`: no exception context leaks into the child
                    r.start(context, transform)
        finally:
            for r in ranges:
                r.stop()
        # Nothing is handed over while a process of this round is alive.
        for s, r in zip(starts, ranges, strict=True):
            for _, row in r.got:
                streak.saw(row)
            good = [torch.from_numpy(a) for a, _ in r.got if a is not None]
            yield Batch(
                torch.stack(good) if good else torch.zeros(0, dtype=torch.uint8),
                [row for a, row in r.got if a is not None],
                [row for a, row in r.got if a is None],
                start=s,
            )
