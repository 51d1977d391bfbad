"""``embedtune validate RECIPE [key=value ...]``: check a recipe completely without loading weights."""

from __future__ import annotations

import argparse

HELP = "check a training recipe (keys, types, values, files, model architecture) without loading weights"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments: the recipe and overrides, as for ``train``."""
    parser.add_argument("recipe", help="a recipe YAML file, or the name of a shipped recipe")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="overrides, as for `embedtune train`"
    )
    parser.add_argument(
        "--no-files", action="store_true", help="skip the checks of data files and model folders"
    )


def check(args: argparse.Namespace) -> None:
    """The recipe file or name (typos get the closest shipped recipe)."""
    from embedtune.commands._checks import check_recipe_source

    check_recipe_source(args.recipe)
    from embedtune.commands.train import _nemo_converted

    _nemo_converted(args)  # a NeMo AutoModel recipe is checked as the recipe it converts to


def run(args: argparse.Namespace) -> int:
    """Print ``OK`` and a summary, or raise ``ConfigError`` naming the problem."""
    from embedtune.commands._checks import load_recipe
    from embedtune.commands.train import _nemo_converted
    from embedtune.training.validate import check_recipe

    _nemo_converted(args)
    cfg = load_recipe(args.recipe, args.overrides)
    notes = check_recipe(cfg, check_files=not args.no_files)
    for note in notes:
        print(f"  {note}")
    print(f"OK: {getattr(args, '_nemo_source', None) or args.recipe} is a valid recipe")
    return 0
