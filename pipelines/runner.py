"""The runner of batch jobs: a reader's entries -> a mapper (decode + model) -> a writer, timed per stage.

The stages never import each other, and the engine is an argument, not a fork of the job: `local`
decodes in crash-isolated loader processes and maps in this process; a distributed engine (Ray)
would build one mapper per actor from the same factory and hand each partition its own writer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from retrieval.errors import RetrieveError
from retrieval.progress import Progress

if TYPE_CHECKING:
    from retrieval.images import Batch, Decoder, ImageFileEntry, IsolationPolicy, Transform


@dataclass
class StageTimer:
    """Accumulates seconds per named stage; `wait` in `read` means the model waited for decoding."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def timed(self, name: str, iterator: Iterator) -> Iterator:
        """Time how long each `next()` of an iterator takes (e.g. waiting on a DataLoader)."""
        it = iter(iterator)
        while True:
            with self.stage(name):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item

    def summary(self) -> str:
        return ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())


class Mapper(Protocol):
    """Decode + model, built once per worker (a class: what a Ray actor is made from)."""

    transform: Transform  # how a file becomes the model's input
    decoder: Decoder  # PIL today; a GPU decoder later

    def __call__(self, batch: Batch) -> np.ndarray:
        """Vectors of the batch's decoded rows (float32, one row per `batch.rows`)."""
        ...


class Writer(Protocol):
    """Where vectors go; `write` may see a batch again after a decoder crash and must not mind."""

    def write(self, batch: Batch, vectors: np.ndarray) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Settings:
    """How the engine runs the stages."""

    batch_size: int
    workers: int  # loader processes (0: decode in this process)
    policy: IsolationPolicy | None = None  # crash-isolation limits (the defaults when None)


def run(
    entries: Sequence[ImageFileEntry],
    make_mapper: Callable[[], Mapper],
    writer: Writer,
    settings: Settings,
    *,
    engine: str = "local",
    progress: Progress | None = None,
    timer: StageTimer | None = None,
) -> int:
    """Run the job's stages over `entries` on `engine`; returns how many files were mapped."""
    if engine not in ENGINES:
        raise RetrieveError(f"Unknown engine {engine!r}; available: {', '.join(ENGINES)}.")
    return ENGINES[engine](
        entries, make_mapper, writer, settings, progress or Progress(), timer or StageTimer()
    )


def _run_local(
    entries: Sequence[ImageFileEntry],
    make_mapper: Callable[[], Mapper],
    writer: Writer,
    settings: Settings,
    progress: Progress,
    timer: StageTimer,
) -> int:
    from retrieval.images import IsolationPolicy, decode_all

    with timer.stage("load model"):
        mapper = make_mapper()
    handed: dict[int, int] = {}  # batch start -> files mapped; a repeat is counted once

    def consume(batch: Batch) -> None:
        with timer.stage("map"):
            vectors = mapper(batch) if batch.rows else np.zeros((0, 0), np.float32)
        with timer.stage("write"):
            writer.write(batch, vectors)
        if batch.start not in handed:  # decode_all hands a batch over again after a crash
            handed[batch.start] = len(batch.rows)
            progress.advance(batch.count)

    try:
        decode_all(
            entries,
            mapper.transform,
            settings.batch_size,
            settings.workers,
            consume,
            wrap=lambda stream: timer.timed("read", stream),
            warn=progress.warn,
            decoder=mapper.decoder,
            policy=settings.policy or IsolationPolicy(),
        )
    finally:
        # Whatever happens (Ctrl-C included), what was written so far is kept for the re-run.
        writer.close()
        progress.stop()
    return sum(handed.values())


ENGINES: dict[str, Callable[..., int]] = {"local": _run_local}
