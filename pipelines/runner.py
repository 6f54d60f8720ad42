"""A tiny stage timer shared by the batch jobs: where did the wall-clock time go?"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


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
