"""``embedtune finetune``: query–document pairs to a fine-tuned, evaluated (and exported) model."""

from __future__ import annotations

import argparse

HELP = "one command: validate, mine hard negatives, train, evaluate before/after, save (and export)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``embedtune finetune``."""
    parser.add_argument("--model", required=True, help="base model: folder, hub id or short name (minilm)")
    parser.add_argument(
        "--data", required=True, help="query-positive pairs: inline .jsonl, corpus-ID .json or a BEIR folder"
    )
    parser.add_argument(
        "--split", default="train", help="qrels split of a BEIR --data folder (default: train)"
    )
    parser.add_argument(
        "--eval", default=None, help="held-out evaluation data (default: carved from --data, said so)"
    )
    parser.add_argument("--eval-split", default="test", help="qrels split of a BEIR --eval folder")
    parser.add_argument("--output", required=True, help="run folder; the model lands in OUTPUT/model")
    parser.add_argument("--export", choices=("onnx",), default=None, help="also export, verified")
    parser.add_argument(
        "--heldout-fraction", type=float, default=0.1, help="share of queries held out when no --eval (0.1)"
    )
    parser.add_argument("--seed", type=int, default=13, help="seed of the split and of training")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a chosen recipe setting when the recipe is first written "
        "(e.g. --set optimizer.lr=3e-5 --set pipeline.mining.num_negatives=8)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="texts per forward pass when encoding")
    parser.add_argument("--ci-resamples", type=int, default=1000, help="bootstrap resamples of the CIs")


def check(args: argparse.Namespace) -> None:
    """Paths, output folder, model and overrides, before anything heavy is imported."""
    from embedtune.commands import _checks
    from embedtune.config import override_path

    _checks.existing_path(args.data, "--data")
    if args.eval:
        _checks.existing_path(args.eval, "--eval")
    _checks.check_output_dir(args.output, "--output")
    args.outputs = [args.output]  # named by the CLI's error boundary when a write fails
    _checks.check_positive(args.batch_size, "--batch-size")
    _checks.check_positive(args.ci_resamples, "--ci-resamples", minimum=0)
    if not 0 < args.heldout_fraction < 1:
        raise _checks.UsageError(f"--heldout-fraction: must be in (0, 1), got {args.heldout_fraction}")
    for item in args.overrides:
        override_path(item)  # KEY=VALUE shape; the keys are checked with the recipe
    if args.export == "onnx":
        _checks.require_package("onnx")
        _checks.require_package("onnxruntime")
    _checks.check_model(args.model)


def run(args: argparse.Namespace) -> int:
    """Run (or resume) the pipeline; 0 when every stage finished."""
    from embedtune.finetune.pipeline import FinetuneOptions, run_finetune

    result = run_finetune(
        FinetuneOptions(
            model=args.model,
            data=args.data,
            output=args.output,
            split=args.split,
            eval=args.eval,
            eval_split=args.eval_split,
            export=args.export,
            heldout_fraction=args.heldout_fraction,
            seed=args.seed,
            device=args.device,
            overrides=args.overrides,
            encode_batch_size=args.batch_size,
            ci_resamples=args.ci_resamples,
        )
    )
    return result.exit_code
