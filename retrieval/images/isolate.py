"""Crash-isolated decoding: `decode_all`, where a file that crashes the decoder costs only itself."""

from __future__ import annotations

import multiprocessing.connection
import pickle
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from retrieval.errors import RetrieveError, first_line
from retrieval.images.decode import Decoder, PILDecoder, Transform
from retrieval.images.loader import (
    CRASH_SIGNALS,
    Batch,
    ImageDataset,
    _before_fork,
    _child_setup,
    _context,
    _loader,
    _patient,
    _Stalled,
    file_row,
)
from retrieval.images.policy import IsolationPolicy
from retrieval.images.scanning import ImageFileEntry


def decode_all(
    entries: Sequence[ImageFileEntry],
    transform: Transform,
    batch_size: int,
    workers: int,
    consume: Callable[[Batch], None],
    *,
    wrap: Callable[[Iterator[Batch]], Iterator[Batch]] = lambda it: it,
    warn: Callable[[str], None] = lambda message: None,
    decoder: Decoder = PILDecoder(),
    policy: IsolationPolicy = IsolationPolicy(),
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
    `decoder` decodes each file, in the loader and isolation processes; `policy` holds the limits.
    """
    pos = 0
    streak = _Streak(policy.max_crashes_in_a_row)
    stall = policy.stall_s(batch_size)
    if workers:
        _before_fork()
    while pos < len(entries):
        it = iter(_loader(entries[pos:], transform, batch_size, workers, decoder, policy))
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
                death = f"died ({first_line(again).rstrip(' .')})"
            if death is None:
                raise
        finally:
            _stop(it)
            it = None
        _before_fork()  # the stopped loader's pipes are finalised here, not in the next children
        # Everything the dead loader had asked its processes for: its prefetch, plus one batch.
        end = min(len(entries), pos + policy.window(batch_size, workers))
        warn(
            f"a decoding process {death}; decoding the {end - pos} files it may have held again, "
            "one process per range, to find any that crash it"
        )
        parallel = max(1, workers)
        for batch in _isolate(entries, pos, end, transform, batch_size, parallel, streak, decoder, policy):
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
        return f"died ({first_line(exc).rstrip(' .')})" if _reports_death(exc) else None
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

    def __init__(self, max_in_a_row: int) -> None:
        self.crashes, self.max_in_a_row = 0, max_in_a_row

    def saw_good(self, n: int) -> None:
        if n:
            self.crashes = 0

    def saw(self, row: dict[str, Any]) -> None:
        self.crashes = self.crashes + 1 if row.get("crash") else 0
        if self.crashes >= self.max_in_a_row:
            raise RetrieveError(
                f"The image decoder crashed on {self.crashes} files in a row (the last {row['path']}): "
                "the machine's image libraries look broken, not the files. Nothing was skipped for "
                "it; fix the installation and run the command again."
            )


def _decode_serially(
    entries: Sequence[ImageFileEntry], transform: Transform, decoder: Decoder, conn: Any
) -> None:
    """Child process: decode `entries` in order and send each result as soon as it is made."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _child_setup()
    dataset = ImageDataset(entries, transform, decoder)
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
    policy: IsolationPolicy
    got: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)
    unexplained: int = 0  # deaths that blame no file, at position `unexplained_at`
    unexplained_at: int = -1
    hung_at: int = -1  # the position of a file that already hung once
    proc: Any = None
    conn: Any = None
    since: float = 0.0  # when the file it is on was started

    def start(self, context: Any, transform: Transform, decoder: Decoder) -> None:
        recv, send = context.Pipe(duplex=False)
        todo = self.entries[len(self.got) :]
        self.proc = context.Process(
            target=_decode_serially, args=(todo, transform, decoder, send), daemon=True
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
        return (
            self.conn is not None and now - self.since > self.policy.file_timeout_s and not self.conn.poll(0)
        )

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
            why = f"no result in {self.policy.file_timeout_s:g} s" if hung else _describe(code)
            reason = f"{'hung' if hung else 'crashed'} the image decoder ({why})"
            # `crash`: a resumed run decodes it again, in case the machine, not the file, was at fault.
            self.got.append((None, {**file_row(culprit), "reason": reason, "crash": True}))
        else:
            at = len(self.got)
            self.unexplained = self.unexplained + 1 if at == self.unexplained_at else 1
            self.unexplained_at = at
            if self.unexplained >= self.policy.max_unexplained_deaths:
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
    decoder: Decoder,
    policy: IsolationPolicy,
) -> Iterator[Batch]:
    """Batches of entries[pos:end], each decoded serially in a process of its own, `parallel` at once.

    A process sends each file's result as it is made, so when it dies the file it was on is the
    one after the last it sent; memory holds `parallel` batches.
    """
    context = _context()
    for round_start in range(pos, end, batch_size * parallel):
        starts = range(round_start, min(end, round_start + batch_size * parallel), batch_size)
        ranges = [_Range(entries[s : min(end, s + batch_size)], policy) for s in starts]
        try:
            for r in ranges:
                r.start(context, transform, decoder)
            while live := {r.conn: r for r in ranges if r.conn is not None}:
                ready = multiprocessing.connection.wait(list(live), timeout=1.0)
                restart = [r for r in (live[c] for c in ready) if not r.receive() and r.ended()]
                now = time.monotonic()
                restart += [r for r in live.values() if r.overdue(now) and r.ended(hung=True)]
                for r in restart:  # outside any `except`: no exception context leaks into the child
                    r.start(context, transform, decoder)
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
