"""The progress protocol of long jobs (index, train, viz, demo): the library prints nothing itself.

Callers pass an object with these methods; the CLI renders them with rich, tests ignore them.
Jobs that report more (training's epochs) extend it.
"""

from __future__ import annotations


class Progress:
    """Callbacks a job reports through; every method may be left as it is (do nothing)."""

    def start(self, total: int, done: int, description: str) -> None:
        """A counted phase begins: `total` items, `done` of them already finished (a resumed run)."""

    def advance(self, n: int) -> None:
        """`n` more items are finished."""

    def note(self, message: str) -> None:
        """Something worth saying (device, what is reused, a fallback)."""

    def warn(self, message: str) -> None:
        """Something the user should act on or know is wrong (random weights, a decoder crash)."""

    def stop(self) -> None:
        """The counted phase ended, normally or not: release any live display."""
