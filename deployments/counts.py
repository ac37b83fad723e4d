"""Whole numbers as clients write them in headers and query strings."""

from __future__ import annotations

# More digits than any count here needs; int() refuses over 4,300 (a ValueError, not a
# parse), and a longer number saturates here instead, as HTTP caches read delta-seconds.
MAX_DIGITS = 18
SATURATED = 10**MAX_DIGITS


def parse_count(text: str) -> int | None:
    """A count written in ASCII digits (no sign, space or other digits), at most
    ``SATURATED``; None when it is not one."""
    if not (text.isascii() and text.isdigit()):
        return None
    return int(text) if len(text) <= MAX_DIGITS else SATURATED
