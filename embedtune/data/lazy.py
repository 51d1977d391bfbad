"""``LazySequence``: a read-only sequence whose items are built on access.

Corpora hold millions of IDs in memory-mapped Arrow columns and data sets hold their examples in flat
arrays; handing either out as a Python list would copy everything. One small type serves all of them:
it knows its length and how to build item ``i``, and optionally how to iterate faster than item by item.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar, overload

__all__ = ["LazySequence"]

T = TypeVar("T")


class LazySequence(Sequence[T]):
    """A sequence of ``length`` items, item ``i`` being ``get(i)`` (built when asked for).

    Args:
        length: Number of items.
        get: Builds item ``i`` for ``0 <= i < length`` (negative indices are resolved before the call).
        iterate: Optional faster full iteration (e.g. chunk by chunk over an Arrow column).
        get_slice: Optional faster contiguous slice ``(start, stop) -> list``.
    """

    __slots__ = ("_get", "_get_slice", "_iterate", "_length")

    def __init__(
        self,
        length: int,
        get: Callable[[int], T],
        *,
        iterate: Callable[[], Iterator[T]] | None = None,
        get_slice: Callable[[int, int], list[T]] | None = None,
    ) -> None:
        self._length = int(length)
        self._get = get
        self._iterate = iterate
        self._get_slice = get_slice

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, i: int) -> T: ...
    @overload
    def __getitem__(self, i: slice) -> list[T]: ...
    def __getitem__(self, i: int | slice) -> T | list[T]:
        if isinstance(i, slice):
            start, stop, step = i.indices(self._length)
            if self._get_slice is not None and step > 0:
                return self._get_slice(start, max(start, stop))[::step]
            return [self._get(j) for j in range(start, stop, step)]
        i = int(i)
        if i < 0:
            i += self._length
        if not 0 <= i < self._length:
            raise IndexError(f"index {i} out of range for {self._length} items")
        return self._get(i)

    def __iter__(self) -> Iterator[T]:
        if self._iterate is not None:
            return self._iterate()
        return (self._get(j) for j in range(self._length))

    def __repr__(self) -> str:
        return f"LazySequence({self._length} items)"
