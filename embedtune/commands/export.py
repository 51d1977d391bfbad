"""``embedtune export onnx``: write a verified ONNX export of a saved bi-encoder."""

from __future__ import annotations

import argparse

HELP = "export a bi-encoder to ONNX (pooling inside the graph) and verify it against PyTorch"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=["onnx"], help="export format (onnx)")
    parser.add_argument(
        "--model", required=True, help="saved bi-encoder folder, LoRA adapter folder, hub id or short name"
    )
    parser.add_argument(
        "--output", required=True, help="folder to write model.onnx, tokenizer, embedtune.json"
    )
    parser.add_argument(
        "--dtype", choices=["fp32", "fp16"], default="fp32", help="precision inside the graph (default fp32)"
    )
    parser.add_argument(
        "--quantize", choices=["int8"], default=None, help="dynamic int8 quantisation of the fp32 graph"
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per text saved with the export (default: model's)",
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the PyTorch vs ONNX Runtime comparison (not advised)"
    )
    parser.add_argument(
        "--min-cosine",
        type=float,
        default=None,
        help="fail, writing nothing, when the worst cosine vs PyTorch is below this "
        "(default fp32 0.9999, fp16 0.999, int8 0.95)",
    )
    parser.add_argument(
        "--eval-data",
        default=None,
        help="BEIR folder for the int8 NDCG@10 check (default: $EMBEDTUNE_EVAL_DATA, else the bundled "
        "data/scifact-mini/test; skipped when neither exists)",
    )
    parser.add_argument("--no-eval", action="store_true", help="skip the int8 NDCG@10 check")
    parser.add_argument(
        "--eval-budget",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="time limit of the int8 NDCG@10 check; it then scores the documents encoded so far (default 120)",
    )
    parser.add_argument("--eval-split", default="test", help="qrels split of --eval-data (default test)")
    parser.add_argument("--eval-queries", type=int, default=50, help="queries in the NDCG slice (default 50)")
    parser.add_argument(
        "--eval-docs", type=int, default=500, help="documents in the NDCG slice: relevant + distractors (500)"
    )


def check(args: argparse.Namespace) -> None:
    """The onnx extra, model, output folder and evaluation data, before anything heavy is imported."""
    from embedtune.commands import _checks
    from embedtune.export.errors import require_int8, require_onnx

    require_onnx()  # before loading a model: the missing extra is the first thing to fix
    if args.quantize == "int8":
        require_int8()
    _checks.check_positive(args.max_length, "--max-length")
    _checks.check_positive(args.eval_queries, "--eval-queries")
    _checks.check_positive(args.eval_docs, "--eval-docs")
    if args.eval_budget <= 0:
        raise _checks.UsageError(
            f"--eval-budget: must be a positive number of seconds, got {args.eval_budget}"
        )
    if args.min_cosine is not None and not -1 <= args.min_cosine <= 1:
        raise _checks.UsageError(f"--min-cosine: must be a cosine in [-1, 1], got {args.min_cosine}")
    if args.eval_data:
        _checks.existing_path(args.eval_data, "--eval-data", kind="dir")
    _checks.check_output_dir(args.output, "--output")
    _checks.check_model(args.model)


def run(args: argparse.Namespace) -> int:
    from embedtune.export.onnx import describe, export_onnx
    from embedtune.export.verify import bundled_eval_data, small_beir_slice

    eval_set = None
    eval_data = args.eval_data or bundled_eval_data()
    if args.quantize and eval_data and not (args.no_verify or args.no_eval):
        eval_set = small_beir_slice(
            eval_data, split=args.eval_split, max_queries=args.eval_queries, max_docs=args.eval_docs
        )
    result = export_onnx(
        args.model,
        args.output,
        dtype=args.dtype,
        quantize=args.quantize,
        opset=args.opset,
        max_length=args.max_length,
        verify=not args.no_verify,
        min_cosine=args.min_cosine,
        eval_set=eval_set,
        eval_budget_s=args.eval_budget,
        log=lambda line: print(line, flush=True),
    )
    print(describe(result))
    return 0
