"""``embedtune cp NAME OUT.yaml``: copy a shipped recipe to edit it."""

from __future__ import annotations

import argparse
from pathlib import Path

from embedtune.errors import ConfigError

HELP = "copy a shipped recipe to a file you can edit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments: recipe name, destination, ``--force``."""
    parser.add_argument("name", help="a shipped recipe (see `embedtune ls`)")
    parser.add_argument("dest", help="where to write it (a file, or a folder to put NAME.yaml in)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")


def check(args: argparse.Namespace) -> None:
    """The destination can be written (the recipe name is checked by ``run``, with close names)."""
    from embedtune.commands._checks import check_output_dir, check_output_file

    dest = Path(args.dest)
    if dest.is_dir():
        check_output_dir(dest, "DEST")
    else:
        check_output_file(dest, "DEST")


def run(args: argparse.Namespace) -> int:
    """Copy the recipe; refuse to overwrite without ``--force``."""
    from embedtune.recipes import list_recipes, recipe_path

    src = recipe_path(args.name)
    if src is None:
        from embedtune.commands._checks import did_you_mean

        raise ConfigError(
            f"{args.name}: no such shipped recipe{did_you_mean(args.name, list_recipes(), cutoff=0.5)}; "
            f"choose one of: {', '.join(list_recipes())}"
        )
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not args.force:
        raise ConfigError(f"{dest}: already exists; pass --force to overwrite it")
    from embedtune._atomic import atomic_file

    with atomic_file(dest, "wb") as f:  # a failed copy keeps the file that was there
        f.write(src.read_bytes())
    print(f"copied {args.name} to {dest}")
    return 0
