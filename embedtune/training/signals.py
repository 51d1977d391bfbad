"""Stopping on SIGTERM/SIGINT: finish the step, save, exit 143/130 — the same on every rank.

A signal only sets :attr:`StopSignals.received`; the recipe reads it after each optimizer step (through
``Parallel.agree_signal``, so every rank stops after the same step and saves the same checkpoint). A
second signal stops at once (``KeyboardInterrupt``).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

__all__ = ["EXIT_SIGINT", "EXIT_SIGTERM", "StopSignals", "exit_code"]

# Exit codes of a run stopped by a signal (128 + signal number, as shells report them).
EXIT_SIGTERM = 143
EXIT_SIGINT = 130


def exit_code(signum: int) -> int:
    """143 for SIGTERM, 130 for SIGINT."""
    return EXIT_SIGTERM if signum == signal.SIGTERM else EXIT_SIGINT


class StopSignals:
    """A context in which SIGTERM/SIGINT set :attr:`received` instead of killing the process.

    Args:
        announce: called with a one-line message when the first signal arrives (e.g. the monitor's
            ``message``); None prints nothing.
    """

    def __init__(self, announce: Callable[[str], None] | None = None) -> None:
        self.announce = announce
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signum
        if self.announce is not None:
            self.announce(f"received {signal.Signals(signum).name}: finishing this step, then saving")

    def __enter__(self) -> StopSignals:
        self._previous = {s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
