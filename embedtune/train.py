"""``python -m embedtune.train RECIPE [key=value ...]``: the module every torchrun rank runs.

``torchrun --nproc-per-node 2 -m embedtune.train recipe.yaml`` and
``embedtune train recipe.yaml --nproc-per-node 2`` are the same run: the second builds the first (see
:mod:`embedtune.launch`). Run without torchrun and without ``--nproc-per-node``, it trains in this one
process, exactly like ``embedtune train``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The recipe, its overrides and the launch options (``--nproc-per-node``, ``--nnodes`` ...)."""
    from embedtune.commands import train as train_command
    from embedtune.launch import add_launch_arguments

    parser = argparse.ArgumentParser(prog="python -m embedtune.train", description=train_command.HELP)
    train_command.add_arguments(parser)
    if not any(a.dest == "nproc_per_node" for a in parser._actions):  # the command may add them itself
        add_launch_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, launch through torchrun when asked, else train in this process; returns the exit status."""
    from embedtune.errors import EmbedtuneError
    from embedtune.launch import launch, launch_requested

    # Intermixed: `recipe.yaml --nproc-per-node 2 a.b=c` (overrides after options) parses too.
    args = build_parser().parse_intermixed_args(argv)
    try:
        if launch_requested(args):
            from embedtune.launch import check_before_launch
            from embedtune.training.config import load_train_config

            # One clear error here rather than one per rank after N processes have started.
            check_before_launch(load_train_config(args.recipe, args.overrides), args)
            return launch([args.recipe, *args.overrides], args)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one of torchrun's ranks
            return _run_rank(args)
        from embedtune.commands.train import run

        return run(args)
    except EmbedtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run_rank(args: argparse.Namespace) -> int:
    """Train as one rank of a torchrun job; returns 0, or 143/130 after a signal (all ranks saved)."""
    from embedtune.training.config import load_train_config
    from embedtune.training.recipe import train

    cfg = load_train_config(args.recipe, args.overrides)  # every rank fails fast on a bad recipe
    result = train(cfg)
    if result.exit_code == 0 and os.environ.get("RANK", "0") == "0":
        print(f"done: {result.state.step} steps ({result.stop_reason}); model saved to {result.model_dir}")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
