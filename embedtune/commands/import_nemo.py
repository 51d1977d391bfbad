"""``embedtune import-nemo NEMO.yaml OUT.yaml``: convert a NeMo AutoModel retrieval recipe.

Reads a NeMo ``TrainBiEncoderRecipe`` / ``TrainCrossEncoderRecipe`` YAML (nothing it names is imported:
``_target_`` values are checked against an allowlist), writes the embedtune recipe that trains the same
thing, and prints once what still differs. ``embedtune train NEMO.yaml`` does the same conversion in
memory. See ``docs/nemo.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from embedtune.errors import ConfigError

HELP = "convert a NeMo AutoModel retrieval recipe (bi-encoder or cross-encoder) to an embedtune recipe"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments: the NeMo recipe, the output file, ``--force``."""
    parser.add_argument("nemo_recipe", help="a NeMo AutoModel recipe YAML (examples/retrieval/...)")
    parser.add_argument("output", help="where to write the embedtune recipe (.yaml)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")


def check(args: argparse.Namespace) -> None:
    """The input exists; the output is new (or ``--force``)."""
    if not Path(args.nemo_recipe).is_file():
        raise ConfigError(f"{args.nemo_recipe}: no such file — give a NeMo AutoModel recipe YAML")
    if Path(args.output).exists() and not args.force:
        raise ConfigError(f"{args.output}: already exists; pass --force to overwrite it")


def convert_file(source: str | Path) -> tuple[str, object]:
    """The embedtune recipe as YAML text (with a header naming the source) and the conversion."""
    import yaml

    from embedtune.nemo.recipe import convert_recipe, read_nemo_recipe

    conversion = convert_recipe(read_nemo_recipe(source), origin=str(source))
    header = [f"# Converted by `embedtune import-nemo` from {source}.", "# What differs from NeMo AutoModel:"]
    header += [f"#   - {d}" for d in conversion.differences]
    body = yaml.safe_dump(conversion.recipe, sort_keys=False, allow_unicode=True, width=100)
    return "\n".join(header) + "\n" + body, conversion


def run(args: argparse.Namespace) -> int:
    """Convert, print the differences, write the recipe atomically."""
    check(args)
    from embedtune._atomic import write_text

    text, conversion = convert_file(args.nemo_recipe)
    print(conversion.report())  # type: ignore[attr-defined]
    write_text(args.output, text)
    print(f"wrote {args.output}; train it with `embedtune train {args.output}`")
    return 0
