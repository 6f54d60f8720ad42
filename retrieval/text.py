"""Text helpers shared by every layer: the natural order of labels and names (c2 before c10), sizes."""

from __future__ import annotations

import re
from collections.abc import Iterable

_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders digit runs by value and the rest case-insensitively: c1, c2, c10."""
    parts = _DIGITS.split(str(text))
    # (0, number) and (1, text) never compare an int with a str, whatever the two strings hold.
    return tuple((0, int(p)) if i % 2 else (1, p.casefold()) for i, p in enumerate(parts))


def natural_sorted(items: Iterable[str]) -> list[str]:
    """`items` in natural order (see natural_key); strings equal under it ("a1", "A01") keep a fixed order."""
    return sorted(items, key=lambda s: (natural_key(s), s))


def format_size(n: float) -> str:
    """Bytes for people, in powers of 1000: "850 B", "2.1 GB"."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
