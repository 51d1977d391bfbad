"""``embedtune train recipe.yaml --nproc-per-node N [--nnodes M ...]``: start the ranks through torchrun.

The launcher adds nothing of its own: it builds a ``torchrun`` command line for
``python -m embedtune.train <recipe> [overrides]`` and runs PyTorch's elastic launcher in this
process, so these two are the same::

    embedtune train recipe.yaml --nproc-per-node 8
    torchrun --standalone --nproc-per-node 8 -m embedtune.train recipe.yaml

Several machines use a c10d rendezvous: run the same command on every node with the same
``--rdzv-endpoint HOST:PORT`` (a reachable address of one of the nodes and a free port)::

    embedtune train recipe.yaml --nnodes 2 --nproc-per-node 8 --rdzv-endpoint node0:29400

Exit status: 0 when training finished; 143 when it was stopped by SIGTERM (every rank saved a
checkpoint first; resume with ``checkpoint.resume=latest``); otherwise torchrun's failure status.
"""

from __future__ import annotations

import argparse
import os
import signal
from collections.abc import Sequence
from typing import Any

from embedtune.errors import ConfigError

__all__ = [
    "EXIT_SIGTERM",
    "add_launch_arguments",
    "check_before_launch",
    "check_launch_arguments",
    "launch",
    "launch_requested",
    "torchrun_argv",
    "torchrun_supports",
]

EXIT_SIGTERM = 143
# Workers get this long after a SIGTERM to finish their step and write a checkpoint before torchrun
# kills them (torchrun's own default, 30 s, is too short for a large model's checkpoint).
DEFAULT_SHUTDOWN_TIMEOUT_S = 600


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--nproc-per-node``, ``--nnodes``, rendezvous options to a sub-command's parser."""
    g = parser.add_argument_group("distributed (launches through torchrun)")
    g.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="N",
        help="processes (ranks) on this machine: usually one per GPU; on CPUs, a few cores each",
    )
    g.add_argument(
        "--nnodes",
        default="1",
        metavar="M[:MAX]",
        help="machines taking part (the same value on every node); needs --rdzv-endpoint when > 1",
    )
    g.add_argument(
        "--rdzv-endpoint",
        default=None,
        metavar="HOST:PORT",
        help="rendezvous address, the same on every node (e.g. the first node's host name and a free port)",
    )
    g.add_argument(
        "--rdzv-id", default="embedtune", metavar="ID", help="job id shared by the nodes of one run"
    )
    g.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="K",
        help="restart the whole group up to K times after a failure (use checkpoint.resume=auto)",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=int,
        default=DEFAULT_SHUTDOWN_TIMEOUT_S,
        metavar="S",
        help="seconds the ranks get to checkpoint after SIGTERM before they are killed",
    )


def _nnodes_max(nnodes: str) -> int:
    try:
        parts = [int(x) for x in str(nnodes).split(":")]
    except ValueError:
        raise ConfigError(
            f"--nnodes {nnodes!r}: expected a number of machines such as 2 (or MIN:MAX)"
        ) from None
    if not parts or len(parts) > 2 or min(parts) < 1:
        raise ConfigError(f"--nnodes {nnodes!r}: expected a number of machines >= 1 (or MIN:MAX)")
    return parts[-1]


def check_launch_arguments(args: argparse.Namespace) -> None:
    """The launch options are consistent (no torch import: runs before the recipe is even loaded).

    Raises:
        ConfigError: a bad process or node count, several nodes without ``--rdzv-endpoint``, or a
            negative timeout/restart count.
    """
    nproc = getattr(args, "nproc_per_node", None)
    if nproc is not None and nproc < 1:
        raise ConfigError(f"--nproc-per-node {nproc}: must be >= 1 (one per GPU is usual)")
    nnodes = getattr(args, "nnodes", "1")
    if _nnodes_max(nnodes) > 1 and not getattr(args, "rdzv_endpoint", None):
        raise ConfigError(
            f"--nnodes {nnodes}: several machines need a meeting point; add --rdzv-endpoint HOST:PORT "
            "with the same value on every node (e.g. the first node's host name and a free port such "
            "as 29400)"
        )
    if getattr(args, "max_restarts", 0) < 0:
        raise ConfigError(f"--max-restarts {args.max_restarts}: must be >= 0")
    if getattr(args, "shutdown_timeout", 1) < 1:
        raise ConfigError(f"--shutdown-timeout {args.shutdown_timeout}: must be >= 1 second")


def torchrun_supports(flag: str) -> bool:
    """Whether the installed torchrun accepts ``flag`` (e.g. ``--shutdown-timeout``, new in 2026: pytorch#172596).

    Asks torchrun's own argument parser, so no version table has to be kept up to date.
    """
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    return any(flag in action.option_strings for action in parser._actions)


def launch_requested(args: argparse.Namespace) -> bool:
    """True when the options ask for several processes and we are not already one of torchrun's ranks."""
    if "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        return False  # already launched: this process is a rank
    nproc = getattr(args, "nproc_per_node", None) or 1
    return nproc > 1 or _nnodes_max(getattr(args, "nnodes", "1")) > 1


def check_before_launch(cfg: Any, args: argparse.Namespace) -> None:
    """Fail before starting any process when the recipe cannot be split over the requested ranks.

    Args:
        cfg: the loaded ``TrainConfig``.
        args: the launch options.

    Raises:
        DistributedError: ``global_batch_size`` is not ``local_batch_size × ranks × accumulation``.
    """
    from embedtune.training.distributed import plan_batches

    if ":" in str(args.nnodes):
        return  # elastic node count: known only at rendezvous; each rank checks then
    world = (args.nproc_per_node or 1) * _nnodes_max(args.nnodes)
    s = cfg.step_scheduler
    plan_batches(s.global_batch_size, s.local_batch_size, world, 0, gradcache=cfg.gradcache.enabled)


def torchrun_argv(
    recipe_argv: Sequence[str],
    *,
    nproc_per_node: int,
    nnodes: str = "1",
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "embedtune",
    max_restarts: int = 0,
    shutdown_timeout: int | None = DEFAULT_SHUTDOWN_TIMEOUT_S,
    entry: Sequence[str] = ("-m", "embedtune.train"),
) -> list[str]:
    """The torchrun arguments that run ``python -m embedtune.train <recipe_argv>`` on every rank.

    Args:
        recipe_argv: the recipe and its ``key=value`` overrides, passed to every rank.
        nproc_per_node: ranks per machine.
        nnodes: machines (``M`` or ``MIN:MAX``).
        rdzv_endpoint: ``HOST:PORT`` of the c10d rendezvous (required for several machines).
        rdzv_id: job id shared by the machines.
        max_restarts: torchrun restarts of the whole group after a failure.
        shutdown_timeout: seconds ranks get after SIGTERM before SIGKILL; None leaves the flag out
            (older torchrun versions have no ``--shutdown-timeout``: see :func:`torchrun_supports`).
        entry: what each rank runs (``-m module`` or a script path).

    Raises:
        ConfigError: several nodes without a rendezvous endpoint, or a bad process count.
    """
    if nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node {nproc_per_node}: must be >= 1 (one per GPU is usual)")
    multi_node = _nnodes_max(nnodes) > 1
    argv = ["--nproc-per-node", str(nproc_per_node), "--max-restarts", str(max_restarts)]
    if shutdown_timeout is not None:
        argv += ["--shutdown-timeout", str(shutdown_timeout)]
    if multi_node:
        if not rdzv_endpoint:
            raise ConfigError(
                f"--nnodes {nnodes}: several machines need a meeting point; add --rdzv-endpoint HOST:PORT "
                "with the same value on every node (e.g. the first node's host name and a free port such "
                "as 29400)"
            )
        argv += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint]
        argv += ["--rdzv-id", rdzv_id]
    elif rdzv_endpoint:
        argv += [
            "--nnodes",
            "1",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            rdzv_endpoint,
            "--rdzv-id",
            rdzv_id,
        ]
    else:
        argv += ["--standalone"]  # a local rendezvous on a free port: no address to choose
    return [*argv, *entry, *recipe_argv]


def launch(
    recipe_argv: Sequence[str], args: argparse.Namespace, *, entry: Sequence[str] = ("-m", "embedtune.train")
) -> int:
    """Run torchrun in this process for ``recipe_argv``; returns the exit status (see module docs).

    Args:
        recipe_argv: the recipe and its overrides.
        args: parsed options from :func:`add_launch_arguments`.
        entry: what each rank runs (default ``-m embedtune.train``).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    shutdown_timeout: int | None = args.shutdown_timeout
    if not torchrun_supports("--shutdown-timeout"):
        print(
            "embedtune: note: this torch's torchrun has no --shutdown-timeout; after a SIGTERM the ranks get "
            "its fixed grace period (30 s) to checkpoint",
            flush=True,
        )
        shutdown_timeout = None
    argv = torchrun_argv(
        recipe_argv,
        nproc_per_node=args.nproc_per_node or 1,
        nnodes=args.nnodes,
        rdzv_endpoint=args.rdzv_endpoint,
        rdzv_id=args.rdzv_id,
        max_restarts=args.max_restarts,
        shutdown_timeout=shutdown_timeout,
        entry=entry,
    )
    print("embedtune: torchrun " + " ".join(argv), flush=True)
    try:
        run(parse_args(argv))
    except SignalException as exc:
        # The launcher itself was signalled (preemption, Ctrl+C): torchrun forwarded the signal to every
        # rank and waited up to --shutdown-timeout for them to checkpoint and exit.
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        # A SIGTERM stop: the ranks exit 143 after saving; a rank still closing when torchrun reaps the
        # group may be reported as killed by that same SIGTERM (-15). Both mean "saved and stopped".
        if codes and EXIT_SIGTERM in codes and all(c in (EXIT_SIGTERM, -signal.SIGTERM) for c in codes):
            return EXIT_SIGTERM
        return max(1, max((c for c in codes if c and c > 0), default=1))
    return 0
