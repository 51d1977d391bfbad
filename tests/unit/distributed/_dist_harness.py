"""Run a function on N gloo ranks (spawned processes) with a hard deadline, and free ports."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, args: tuple[Any, ...]) -> None:
    import torch

    from embedtune.training import distributed as D

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    torch.set_num_threads(1)  # two cores shared by everyone: one thread per rank
    # A short collective timeout: a rank that fails makes the other fail within a minute, not hang.
    D.init_distributed(D.DistributedConfig(timeout_minutes=1.0), device="cpu")
    try:
        fn(rank, world, *args)
    finally:
        D.destroy_distributed()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 120.0) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned ranks; raise if any fails or time runs out.

    ``fn`` must be importable (a module-level function); results go through files.
    """
    ctx = mp.start_processes(
        _entry, args=(fn, world, free_port(), args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks did not finish within {timeout:.0f} s")
    finally:
        for p in ctx.processes:  # only our own children, by handle
            if p.is_alive():
                p.kill()
                p.join(5)


def launch_ranks(
    script: str, world: int, args: list[str], *, port: int | None = None, log_dir: str | None = None
) -> list[Any]:
    """Start ``python script args`` once per rank (plain processes: the test can signal one rank).

    Returns the ``subprocess.Popen`` handles in rank order; stdout/stderr go to ``log_dir/rank{r}.log``.
    """
    import subprocess
    import sys

    port = port or free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            OMP_NUM_THREADS="1",
        )
        log_path = os.path.join(log_dir, f"rank{rank}.log") if log_dir else None
        log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, script, *args], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        proc.log_path = log_path  # type: ignore[attr-defined]  # read by wait_all when a rank hangs
        procs.append(proc)
    return procs


def wait_all(procs: list[Any], timeout: float) -> list[int]:
    """Wait for every process (killing all of them after ``timeout`` s); returns the exit codes.

    Raises:
        TimeoutError: a rank was still running at the deadline. The message names the ranks that hung
            and ends with their logs, including the Python stacks of every thread: a script that
            calls :func:`dump_stacks_on_sigusr1` prints them when asked, just before it is killed.
    """
    import signal
    import subprocess

    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        hung = [r for r, p in enumerate(procs) if p.poll() is None]
        for r in hung:
            procs[r].send_signal(signal.SIGUSR1)
        time.sleep(3)  # time to write the stacks
        _kill(procs)
        logs = "\n".join(
            f"--- rank {r} ---\n" + Path(p.log_path).read_text(errors="replace")[-6000:]
            for r, p in enumerate(procs)
            if getattr(p, "log_path", None)
        )
        codes = [p.returncode for p in procs]
        raise TimeoutError(
            f"ranks {hung} still ran after {timeout:.0f} s (exit codes {codes})\n{logs}"
        ) from None
    except BaseException:
        _kill(procs)
        raise
    return [p.returncode for p in procs]


def _kill(procs: list[Any]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(5)


def dump_stacks_on_sigusr1() -> None:
    """In a rank script: SIGUSR1 prints every thread's Python stack to stderr (see :func:`wait_all`)."""
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)
