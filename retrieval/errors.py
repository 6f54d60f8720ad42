"""Exceptions that carry a message meant for the user; the CLI turns them into one line and an exit code."""

from __future__ import annotations

import re

# A setting named inside a message: «image_size». The library speaks in settings, not flags; the
# CLI renders each as its flag (--image-size) in the one place that prints errors, and Python
# callers read the plain name.
_SETTING = re.compile(r"«([a-z][a-z0-9_]*)»")


def as_flags(text: str) -> str:
    """A library message as the command line says it: «image_size» -> --image-size."""
    return _SETTING.sub(lambda m: "--" + m.group(1).replace("_", "-"), text)


def as_names(text: str) -> str:
    """A library message as Python says it: «image_size» -> image_size."""
    return _SETTING.sub(lambda m: m.group(1), text)


class RetrieveError(Exception):
    """Base class: an error whose message is complete and actionable on its own.

    Settings are written «name» in the message; `str()` gives the names, `for_cli()` the flags.
    """

    exit_code = 2

    def __str__(self) -> str:
        return as_names(super().__str__())

    def for_cli(self) -> str:
        return as_flags(Exception.__str__(self))


class UnknownNameError(RetrieveError, KeyError):
    """A name (backbone, layer, method...) that is not known; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would otherwise wrap the message in quotes
        return as_names(str(self.args[0])) if self.args else ""

    def for_cli(self) -> str:
        return as_flags(str(self.args[0])) if self.args else ""


class WeightsUnavailableError(RetrieveError):
    """Pretrained weights are neither cached nor downloadable."""


class CheckpointError(RetrieveError):
    """A checkpoint file is corrupt, of the wrong kind, or for another architecture."""


class IndexNotFoundError(RetrieveError):
    """No index at the given path, or no index built yet."""


class IndexFormatError(RetrieveError):
    """An index directory exists but cannot be read (version, missing files, mismatch)."""


class BadImageError(RetrieveError):
    """One image cannot be decoded; the reason goes into the skip ledger."""


class EmptyInputError(RetrieveError):
    """A folder holds no usable images."""


class NoSpaceError(RetrieveError):
    """The device holding an index is (or would become) full; the message says what is intact."""

    exit_code = 1


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message for a one-line error, cut at a word near `limit`
    characters; "no details" for an empty message (an empty file gives IndexError(""))."""
    lines = str(exc).splitlines()
    if not lines:
        return "no details"
    return lines[0] if len(lines[0]) <= limit else lines[0][:limit].rsplit(" ", 1)[0] + " ..."
