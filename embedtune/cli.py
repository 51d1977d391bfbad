"""The ``embedtune`` command line.

Each sub-command lives in its own module under ``embedtune.commands`` and exposes::

    HELP: str                                   # one line for ``embedtune --help``
    NAME: str                                   # optional: the command's name (default: the module's,
                                                #   with "_" written "-", e.g. import_nemo -> import-nemo)
    def add_arguments(parser: argparse.ArgumentParser) -> None
    def check(args: argparse.Namespace) -> None # optional: cheap checks, before anything heavy
    def run(args: argparse.Namespace) -> int    # the exit code

A new command is a new module in ``embedtune/commands/``: it is found and registered without editing
this file (``ORDER`` only sets where the well-known ones appear in ``--help``).

**Fail fast.** Command modules import torch and friends inside ``run``; ``check`` verifies paths, names
and values with the helpers of ``embedtune.commands._checks`` (no torch), so ``embedtune --help`` and
every argument error answer in a fraction of a second.

**One error boundary.** User errors (``EmbedtuneError``), file-system errors (no space, permission,
missing file, read-only), a missing optional package and Ctrl+C each end in one or two lines that name
the path or package and the fix, with a non-zero exit code and no traceback; ``--debug`` (anywhere on
the command line) or ``EMBEDTUNE_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import pkgutil
import sys
from types import ModuleType

from embedtune.errors import EmbedtuneError, missing_dependency_message

# Where the well-known commands appear in `embedtune --help`; any other module in embedtune/commands
# that defines HELP, add_arguments and run is added after them, in alphabetical order.
ORDER = (
    "demo",
    "train",
    "finetune",
    "validate",
    "ls",
    "cp",
    "validate-data",
    "eval",
    "compare",
    "audit",
    "search",
    "encode",
    "export",
    "mine",
    "rerank",
    "info",
    "import-nemo",
)

# Exit codes: a usage/input error (as argparse), an environment error (disk, permissions, packages),
# and Ctrl+C (the shell's 128 + SIGINT).
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 1
EXIT_INTERRUPTED = 130


def discover_commands() -> dict[str, ModuleType]:
    """Command name -> module, for every module in ``embedtune.commands`` that is a command."""
    import embedtune.commands as package

    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue  # shared helpers (_options, _checks)
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if not all(hasattr(module, a) for a in ("HELP", "add_arguments", "run")):
            continue
        found[getattr(module, "NAME", info.name.replace("_", "-"))] = module
    rank = {name: i for i, name in enumerate(ORDER)}
    return dict(sorted(found.items(), key=lambda kv: (rank.get(kv[0], len(ORDER)), kv[0])))


def _debug_parent() -> argparse.ArgumentParser:
    # `--debug` after the command name too (`embedtune eval ... --debug`), without overriding a
    # `--debug` given before it.
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parent


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every available sub-command."""
    parser = argparse.ArgumentParser(
        prog="embedtune",
        description="Turn language models into text-embedding models: convert, fine-tune, evaluate, export.",
        epilog="Errors print one line; --debug (or EMBEDTUNE_DEBUG=1) shows the full traceback.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parent = _debug_parent()
    for name, module in discover_commands().items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP, parents=[parent])
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _check=getattr(module, "check", None))
    return parser


def _debug_requested(args: argparse.Namespace | None) -> bool:
    env = os.environ.get("EMBEDTUNE_DEBUG", "").lower() in ("1", "true", "yes", "on")
    return env or bool(getattr(args, "debug", False))


# File-system errors that are about the machine, not the input: reported as such even when a library
# error wraps them.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})

# Arguments that name what a command writes; a failed write() carries no file name, so the message
# names these instead. A command's check() may also set ``args.outputs`` (train: the recipe's output_dir).
OUTPUT_ARGUMENTS = ("output", "run", "json", "dest", "cache_dir")


def _outputs_of(args: argparse.Namespace) -> list[str]:
    found = [str(p) for p in getattr(args, "outputs", None) or []]
    found += [str(getattr(args, a)) for a in OUTPUT_ARGUMENTS if getattr(args, a, None)]
    return found


def describe_os_error(exc: OSError, outputs: list[str] | None = None) -> str:
    """One line for a file-system error: what happened, to which path, and what to do.

    Args:
        exc: the error.
        outputs: what the command writes, named when the error carries no path (a failed ``write``).
    """
    path = exc.filename if exc.filename is not None else (" / ".join(outputs) if outputs else None)
    where = f"{path}" if path else "a file"
    if exc.filename2:
        where += f" -> {exc.filename2}"
    code = exc.errno
    if code == errno.ENOSPC or code == errno.EDQUOT:
        return (
            f"no space left on the device holding {where} — free some space, or write elsewhere "
            "(--output, output_dir=..., or TMPDIR for temporary files)"
        )
    if code in (errno.EACCES, errno.EPERM):
        return (
            f"permission denied: {where} — choose a folder you can write (--output / output_dir=...), "
            "or fix the folder's permissions"
        )
    if code == errno.EROFS:
        return f"read-only file system: {where} — write to a folder on a writable disk (--output / output_dir=...)"
    if code == errno.ENOENT:
        return f"no such file or folder: {where} — check the path (relative paths start at {os.getcwd()})"
    if code == errno.EISDIR:
        return f"{where} is a folder where a file was expected — give a file path"
    if code == errno.ENOTDIR:
        return f"{where}: a part of this path is a file, not a folder — check the path"
    if code == errno.EMFILE:
        return "too many open files — raise the limit (`ulimit -n 4096`) and run again"
    text = (exc.strerror or str(exc) or type(exc).__name__).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return f"{where}: {first}" if path else first


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``embedtune`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return EXIT_USAGE
    prog = f"embedtune {args.command}"
    debug = _debug_requested(args)
    try:
        try:
            if args._check is not None:
                args._check(args)  # paths, names, values: before any heavy import or model load
            return int(args._run(args) or 0)
        except EmbedtuneError as exc:
            # A library error wrapping a full disk or a permission problem: report the disk problem.
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno in ENVIRONMENT_ERRNOS and not debug:
                raise cause from None
            raise
    except EmbedtuneError as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # `embedtune search ... | head`: the reader left; stop quietly as other Unix tools do.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (Python flushes stdout at exit)
        return 141
    except OSError as exc:
        if debug:
            raise
        print(f"{prog}: error: {describe_os_error(exc, _outputs_of(args))}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except ImportError as exc:
        if debug:
            raise
        print(f"{prog}: error: {missing_dependency_message(exc)}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except MemoryError:
        if debug:
            raise
        print(
            f"{prog}: error: out of memory — lower --batch-size (or step_scheduler.local_batch_size / "
            "gradcache for training)",
            file=sys.stderr,
        )
        return EXIT_ENVIRONMENT
    except KeyboardInterrupt:
        if debug:
            raise
        hint = " (resume training with checkpoint.resume=latest)" if args.command == "train" else ""
        print(f"{prog}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
