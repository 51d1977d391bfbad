"""``embedtune ls``: list the shipped training recipes."""

from __future__ import annotations

import argparse

HELP = "list the shipped training recipes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No arguments besides ``--paths``."""
    parser.add_argument("--paths", action="store_true", help="print each recipe's file path too")


def run(args: argparse.Namespace) -> int:
    """Print one recipe per line: name and description."""
    from embedtune.recipes import list_recipes, recipe_path

    recipes = list_recipes()
    width = max((len(n) for n in recipes), default=0)
    for name, desc in recipes.items():
        line = f"{name:<{width}}  {desc}"
        if args.paths:
            line += f"  [{recipe_path(name)}]"
        print(line)
    print("\ncopy one with `embedtune cp NAME my_recipe.yaml`, or run it with `embedtune train NAME`")
    return 0
