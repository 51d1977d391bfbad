"""The header every benchmark prints, and where its table is kept.

    from _machine import recorded
    with recorded("encode_throughput", argv=sys.argv[1:]):
        ...print the table...

prints the machine (CPU model, AMX / avx512_bf16 flags, threads, measured fp32 and bf16 matmul peaks)
first, and on success writes the header, the command line and everything printed to
``benchmarks/results/<name>_<machine tag>.txt``, so that numbers from two kinds of machine never mix.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's embedtune

from embedtune.machine import MachineInfo, machine_info

RESULTS = Path(__file__).resolve().parent / "results"


def shared_data(name: str) -> Path:
    """``shared/data/<name>`` beside the checkout or any folder above it (worktrees sit deeper)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "shared" / "data" / name).is_dir():
            return parent / "shared" / "data" / name
    return here.parents[2] / "shared" / "data" / name


class _Tee(io.TextIOBase):
    """Write to the real stdout and keep a copy."""

    def __init__(self, real: io.TextIOBase) -> None:
        self.real, self.copy = real, io.StringIO()

    def write(self, s: str) -> int:
        self.copy.write(s)
        return self.real.write(s)

    def flush(self) -> None:
        self.real.flush()


def header(threads: int | None = None, *, measure: bool = True) -> tuple[MachineInfo, str]:
    """This machine at ``threads`` torch threads (default: torch's current setting) and its header text."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        info = machine_info(measure=measure)
    finally:
        torch.set_num_threads(before)
    return info, info.describe()


@contextlib.contextmanager
def recorded(
    name: str, *, argv: Sequence[str] = (), threads: int | None = None, suffix: str = ""
) -> Iterator[MachineInfo]:
    """Print the machine header, run the body, then store header + output under ``benchmarks/results/``.

    Args:
        name: the benchmark's name (the file name's start).
        argv: the command-line arguments, recorded with the table.
        threads: the thread count the benchmark runs at (for the measured peaks).
        suffix: distinguishes variants of one benchmark (e.g. ``"_bf16"``).
    """
    info, text = header(threads)
    print(text, flush=True)
    tee = _Tee(sys.stdout)  # type: ignore[arg-type]
    with contextlib.redirect_stdout(tee):
        yield info
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}{suffix}_{info.tag}.txt"
    body = (
        f"# {name} — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
        f"# command: python benchmarks/{name}.py {' '.join(argv)}\n{text}\n\n{tee.copy.getvalue()}"
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(body, encoding="utf-8")
    os.replace(tmp, path)  # atomic: a crash never leaves half a table
    print(f"(stored in {path.relative_to(RESULTS.parents[1])})")
