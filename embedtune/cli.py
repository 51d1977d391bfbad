"""The ``embedtune`` command line.

Each sub-command lives in its own module under ``embedtune.commands`` and exposes::

    HELP: str                                   # one line for ``embedtune --help``
    def add_arguments(parser: argparse.ArgumentParser) -> None
    def run(args: argparse.Namespace) -> int    # the exit code

Command modules import torch and friends inside ``run`` so that ``embedtune --help`` stays fast.
User errors (``EmbedtuneError``) are printed as one clear line, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from embedtune.errors import EmbedtuneError

# Sub-command name -> module. A module that does not exist yet is simply not offered.
COMMANDS: dict[str, str] = {
    "demo": "embedtune.commands.demo",
    "train": "embedtune.commands.train",
    "validate": "embedtune.commands.validate",
    "ls": "embedtune.commands.ls",
    "cp": "embedtune.commands.cp",
    "validate-data": "embedtune.commands.validate_data",
    "eval": "embedtune.commands.eval",
    "search": "embedtune.commands.search",
    "encode": "embedtune.commands.encode",
    "export": "embedtune.commands.export",
    "mine": "embedtune.commands.mine",
    "rerank": "embedtune.commands.rerank",
    "info": "embedtune.commands.info",
    "compare": "embedtune.commands.compare",
    "audit": "embedtune.commands.audit",
}


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available sub-command."""
    parser = argparse.ArgumentParser(
        prog="embedtune",
        description="Turn language models into text-embedding models: convert, fine-tune, evaluate, export.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # not written yet: skip; a broken import inside it still raises
                continue
            raise
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``embedtune`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except EmbedtuneError as exc:
        if args.debug:
            raise
        print(f"embedtune {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"embedtune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
