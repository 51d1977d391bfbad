"""``embedtune train RECIPE [key=value ...]``: train from a recipe — a bi-encoder, distillation into one
(a ``distill:`` block) or a cross-encoder reranker (``recipe: rerank``), on one process or under torchrun."""

from __future__ import annotations

import argparse
import os

HELP = "fine-tune an embedding model from a YAML recipe (contrastive, LoRA, GradCache, resumable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments: the recipe and ``key.path=value`` overrides."""
    parser.add_argument(
        "recipe", help="a recipe YAML file, or the name of a shipped recipe (see `embedtune ls`)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override recipe values, e.g. optimizer.lr=1e-5 step_scheduler.max_steps=10 checkpoint.resume=latest",
    )
    from embedtune.launch import add_launch_arguments

    add_launch_arguments(parser)  # --nproc-per-node, --nnodes, --rdzv-endpoint: see docs/distributed.md


def _nemo_converted(args: argparse.Namespace) -> None:
    """A NeMo AutoModel recipe is converted (printed once) and trained as its embedtune equivalent."""
    from pathlib import Path

    from embedtune.config import read_yaml
    from embedtune.nemo.recipe import is_nemo_recipe

    path = Path(args.recipe)
    if getattr(args, "_nemo_source", None) or not path.is_file() or not is_nemo_recipe(read_yaml(path)):
        return
    import tempfile

    from embedtune._atomic import write_text
    from embedtune.commands.import_nemo import convert_file

    text, conversion = convert_file(path)
    print(conversion.report())  # type: ignore[attr-defined]
    out = Path(tempfile.mkdtemp(prefix="embedtune-nemo-")) / f"{path.stem}.embedtune.yaml"
    write_text(out, text)
    print(f"converted recipe: {out}")
    args._nemo_source, args.recipe = str(path), str(out)


def check(args: argparse.Namespace) -> None:
    """Recipe, overrides, model, data and output folder, before anything heavy is imported.

    One schema for every task (bi-encoder, ``distill:``, ``recipe: rerank``), so one check for all.
    """
    from embedtune.commands import _checks
    from embedtune.launch import check_launch_arguments

    check_launch_arguments(args)
    _checks.check_recipe_source(args.recipe)
    _nemo_converted(args)
    cfg = _checks.load_recipe(args.recipe, args.overrides)
    args.outputs = [cfg.output_dir]  # named by the CLI's error boundary when a write fails
    _checks.check_recipe_paths(cfg)
    _checks.check_train_outputs(cfg)


def run(args: argparse.Namespace) -> int:
    """Validate the recipe, train, and return 0 (done), 143/130 (stopped by SIGTERM/SIGINT, resumable)."""
    from embedtune.commands._checks import load_recipe

    _nemo_converted(args)
    cfg = load_recipe(args.recipe, args.overrides)  # fails fast, before any model is loaded

    # Distributed: start N ranks through torchrun (each runs `python -m embedtune.train`), or, when
    # this process is one of torchrun's ranks, train as that rank.
    from embedtune.launch import check_before_launch, launch, launch_requested

    if launch_requested(args):
        check_before_launch(cfg, args)  # an unsplittable batch fails here, before N processes start
        return launch([args.recipe, *args.overrides], args)
    # One loop for every task (bi-encoder, `distill:`, `recipe: rerank`) and every world size: as one of
    # torchrun's ranks (WORLD_SIZE > 1) it joins the job, else it is the only process.
    from embedtune.training.recipe import train

    result = train(cfg)
    if result.exit_code == 0 and int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {result.state.step} steps ({result.stop_reason}); model saved to {result.model_dir}")
        if result.adapter_dir is not None and result.adapter_dir != result.model_dir:
            print(f"LoRA adapter saved to {result.adapter_dir}")
    return result.exit_code
