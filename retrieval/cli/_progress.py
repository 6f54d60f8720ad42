"""The pipelines' progress callbacks rendered as a rich bar with items/s, for the commands that build."""

from __future__ import annotations

from retrieval.cli._app import err_console


class RichProgress:
    """Renders the pipeline's progress callbacks as a rich bar with images/s."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=False,
        )
        self.task = None
        self._start = 0.0
        self._n = 0
        self._unit = "img/s"

    def start(self, total: int, done: int, description: str) -> None:
        import time

        self._start = time.perf_counter()
        self._n = 0  # each phase's own rate: adding to an index after reading 1M vectors is not 2x faster
        self._unit = "img/s" if description.startswith("embedding") else "/s"  # vectors, rows, ...
        self.task = self.bar.add_task(description, total=total, completed=done, rate="")
        self.bar.start()

    def advance(self, n: int) -> None:
        import time

        self._n += n
        rate = self._n / max(time.perf_counter() - self._start, 1e-9)
        self.bar.update(self.task, advance=n, rate=f"{rate:,.0f} {self._unit}")

    # Messages are plain text that may quote paths: printed without markup, styled whole.
    def note(self, message: str) -> None:
        err_console.print(message, highlight=False, markup=False)

    def warn(self, message: str) -> None:
        err_console.print(message, style="bold yellow", highlight=False, markup=False)

    def stop(self) -> None:
        self.bar.stop()
