"""Problems found in data files, and the one error type that carries them.

Every check in the data layer reports a :class:`Problem` instead of raising at the first bad row, so
that a user sees *all* of what is wrong with a file (the first 20, then a count) before hours of
training are spent. A problem prints as ``file:line: field: what is wrong — how to fix it``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from embedtune.errors import DataError

#: How many problems an error message lists before it only gives the count.
SHOWN_PROBLEMS = 20
#: How many problems are kept in memory; beyond this only the count grows (a 2 GB file that is
#: wrong on every line must not hold millions of messages).
KEPT_PROBLEMS = 10_000

ON_BAD_ROW_CHOICES = ("error", "skip")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one place in a data file.

    Attributes:
        file: The file as the user named it.
        line: 1-based line number (JSONL, TSV, JSON record) or row number (Parquet); None when the
            problem concerns the whole file.
        field: The field or JSON path, e.g. ``pos_doc[1].text`` or ``data[3].pos_doc[0].id``.
        what: What is wrong.
        fix: How to fix it.
    """

    file: str
    line: int | None
    field: str
    what: str
    fix: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.field}: {self.what} — {self.fix}"


class DataValidationError(DataError):
    """A data file has one or more problems; ``problems`` lists them (``total`` counts them all).

    It is a :class:`~embedtune.errors.DataError`, so callers catch it as that.
    """

    def __init__(self, problems: list[Problem], total: int | None = None) -> None:
        self.problems = list(problems)
        self.total = max(total if total is not None else 0, len(self.problems))
        super().__init__(format_problems(self.problems, self.total))


def format_problems(problems: list[Problem], total: int | None = None) -> str:
    """Render problems as one message: a count, the first 20, then how many more there are."""
    total = max(total or 0, len(problems))
    noun = "problem" if total == 1 else "problems"
    lines = [f"{total} {noun} found in the data:"]
    lines += [f"  {p}" for p in problems[:SHOWN_PROBLEMS]]
    if total > SHOWN_PROBLEMS:
        lines.append(f"  ... and {total - SHOWN_PROBLEMS} more")
    return "\n".join(lines)


class ProblemLog:
    """Collects problems while a file is read; decides at the end whether to raise or warn.

    Args:
        on_bad_row: ``"error"`` raises :class:`DataValidationError` listing every problem once the
            whole input has been read; ``"skip"`` drops the bad rows and warns once with the count.
    """

    def __init__(self, on_bad_row: str = "error") -> None:
        if on_bad_row not in ON_BAD_ROW_CHOICES:
            from embedtune.errors import ConfigError

            raise ConfigError(f"on_bad_row: {on_bad_row!r} is not one of {', '.join(ON_BAD_ROW_CHOICES)}")
        self.on_bad_row = on_bad_row
        self.problems: list[Problem] = []
        self.total = 0
        self.skipped_rows = 0

    def add(self, problem: Problem) -> None:
        """Record one problem (kept up to :data:`KEPT_PROBLEMS`, always counted)."""
        self.total += 1
        if len(self.problems) < KEPT_PROBLEMS:
            self.problems.append(problem)

    def extend(self, problems: Iterable[Problem]) -> None:
        """Record several problems."""
        for p in problems:
            self.add(p)

    def fatal(self, problem: Problem) -> DataValidationError:
        """A problem that makes the rest of the input unreadable: returns the error to raise now."""
        self.add(problem)
        return DataValidationError(self.problems, self.total)

    def finish(self, what: str) -> None:
        """Raise (``on_bad_row: error``) or warn once (``skip``) if anything was found.

        Args:
            what: The input, for the warning (e.g. the file name).

        Raises:
            DataValidationError: when problems were found and ``on_bad_row`` is ``"error"``.
        """
        if not self.total:
            return
        if self.on_bad_row == "error":
            raise DataValidationError(self.problems, self.total)
        warnings.warn(
            f"{what}: skipped {self.skipped_rows} bad row(s) ({self.total} problem(s)) because "
            f"on_bad_row is 'skip'; first: {self.problems[0]}",
            UserWarning,
            stacklevel=3,
        )
