"""Progress for loops over batches: a tqdm bar on a terminal, plain lines in a log file.

tqdm redraws its bar with carriage returns, which a log file or CI output keeps as one long line of
frames; off a terminal we print a line every ``every_s`` seconds (and at the end) instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["is_terminal", "progress"]

T = TypeVar("T")


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes and closed streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress(
    items: Iterable[T],
    *,
    total: int,
    desc: str,
    unit: str = "batch",
    enabled: bool = True,
    every_s: float = 15.0,
) -> Iterator[T]:
    """Yield ``items``, showing progress on stderr when ``enabled``.

    Args:
        items: what to iterate over.
        total: how many items there are (for the percentage).
        desc: the label, e.g. ``"encode documents"``.
        unit: what one item is.
        enabled: False shows nothing.
        every_s: off a terminal, the seconds between two progress lines.
    """
    if not enabled:
        yield from items
        return
    if is_terminal(sys.stderr):
        from tqdm.auto import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr)
        return
    start = last = time.perf_counter()
    for done, item in enumerate(items, start=1):
        yield item
        now = time.perf_counter()
        if now - last >= every_s or done == total:
            last = now
            pct = f" ({100 * done / total:.0f}%)" if total else ""
            print(f"{desc}: {done}/{total} {unit}{pct}, {now - start:.0f} s", file=sys.stderr, flush=True)
