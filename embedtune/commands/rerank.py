"""``embedtune rerank``: train a cross-encoder, rerank a bi-encoder's top-k and report the gain, export it.

embedtune rerank train RECIPE [key=value ...]        # recipe: rerank (see embedtune.reranker.train)
embedtune rerank eval --reranker DIR --retriever MODEL --data BEIR_OR_FILE [--split test] [--top-k 100]
embedtune rerank score --reranker DIR --query TEXT --passage TEXT [--passage TEXT ...]
embedtune rerank export --reranker DIR --output DIR     # ONNX, verified against PyTorch
"""

from __future__ import annotations

import argparse
import json

HELP = (
    "cross-encoder reranker: train (recipe: rerank), eval (gain over a bi-encoder's top-k), score, export, "
    "distill (bi-encoder training with a KL term to the reranker)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``train``, ``eval``, ``score`` and ``export`` actions."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    t = sub.add_parser("train", help="train a reranker from a YAML recipe with `recipe: rerank`")
    t.add_argument(
        "recipe", help="a training recipe (recipe: rerank is implied; see embedtune.reranker.train)"
    )
    t.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. optimizer.lr=5e-5 step_scheduler.num_epochs=2"
    )

    e = sub.add_parser("eval", help="rerank a bi-encoder's top-k on an evaluation set and report the gain")
    e.add_argument("--reranker", required=True, help="reranker folder (or a backbone to score untrained)")
    e.add_argument("--retriever", required=True, help="bi-encoder whose top-k is reranked")
    e.add_argument("--data", required=True, help="BEIR folder, corpus-ID .json or inline .jsonl")
    e.add_argument("--split", default="test", help="qrels split of a BEIR folder")
    e.add_argument("--top-k", type=int, default=100, help="documents reranked per query (default 100)")
    e.add_argument("--batch-size", type=int, default=64, help="bi-encoder texts per forward pass")
    e.add_argument("--rerank-batch-size", type=int, default=32, help="pairs per reranker forward pass")
    e.add_argument("--max-length", type=int, default=None, help="bi-encoder tokens per text")
    e.add_argument(
        "--fusion-weight", type=float, default=None, help="also report reranker/retriever interpolation"
    )
    e.add_argument("--bf16", action="store_true", help="bfloat16 autocast for both models")
    e.add_argument("--cache-dir", default=None, help="corpus-embedding cache (default: embedtune's)")
    e.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    e.add_argument("--device", default=None, help="cpu or cuda")

    s = sub.add_parser("score", help="score passages for one query")
    s.add_argument("--reranker", required=True)
    s.add_argument("--query", required=True)
    s.add_argument("--passage", action="append", required=True, help="repeat for several passages")

    d = sub.add_parser("distill", help="train a bi-encoder (embedtune train recipe) with a `distill:` block")
    d.add_argument(
        "recipe", help="a training recipe plus distill: {weight, teacher, teacher_temperature, ...}"
    )
    d.add_argument("overrides", nargs="*", help="key=value overrides, e.g. distill.weight=0.5")

    x = sub.add_parser("export", help="export to ONNX and verify against PyTorch")
    x.add_argument("--reranker", required=True)
    x.add_argument("--output", required=True, help="output folder (model.onnx + tokenizer + settings)")
    x.add_argument(
        "--atol", type=float, default=1e-4, help="largest allowed |ONNX - PyTorch| score difference"
    )


def check(args: argparse.Namespace) -> None:
    """Recipes, models, data and outputs of each action, before anything heavy is imported."""
    from embedtune.commands import _checks

    if args.action in ("train", "distill"):
        _checks.check_recipe_source(args.recipe)
        return
    _checks.check_model(args.reranker, "--reranker")
    if args.action == "eval":
        _checks.existing_path(args.data, "--data")
        _checks.check_model(args.retriever, "--retriever")
        for value, flag in (
            (args.top_k, "--top-k"),
            (args.batch_size, "--batch-size"),
            (args.rerank_batch_size, "--rerank-batch-size"),
            (args.max_length, "--max-length"),
        ):
            _checks.check_positive(value, flag)
        if args.json:
            _checks.check_output_file(args.json, "--json")
    elif args.action == "score":
        if not args.query.strip():
            raise _checks.UsageError("--query: give a non-empty query text")
    elif args.action == "export":
        _checks.check_output_dir(args.output, "--output")


def run(args: argparse.Namespace) -> int:
    """Dispatch to the action."""
    if args.action in ("train", "distill"):
        # One recipe schema and one loop: `rerank train` is `embedtune train` of a `recipe: rerank` recipe,
        # `rerank distill` of one with a `distill:` block.
        from embedtune.training.config import load_train_config
        from embedtune.training.recipe import train

        overrides = list(args.overrides)
        if args.action == "train":
            overrides.append("recipe=rerank")
        cfg = load_train_config(args.recipe, overrides)  # fails fast, before any model is loaded
        if args.action == "distill" and cfg.distill is None:
            from embedtune.errors import ConfigError

            raise ConfigError(f"{args.recipe}: distill: block missing — add distill: {{weight: 1.0, ...}}")
        result = train(cfg)
        if result.exit_code == 0:
            print(
                json.dumps(
                    {
                        "model_dir": str(result.model_dir),
                        "steps": result.state.step,
                        "final_loss": (result.losses or [float("nan")])[-1],
                        "stop_reason": result.stop_reason,
                    },
                    indent=2,
                )
            )
        return int(result.exit_code)
    if args.action == "eval":
        return _eval(args)
    if args.action == "score":
        from embedtune.reranker import CrossEncoderReranker

        model = CrossEncoderReranker.from_pretrained(args.reranker)
        for i, score in model.rerank(args.query, args.passage):
            print(f"{score:+.4f}\t{args.passage[i]}")
        return 0
    from embedtune.reranker.onnx import export_reranker_onnx

    report = export_reranker_onnx(args.reranker, args.output, atol=args.atol)
    print(json.dumps(report, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from embedtune.eval.cache import default_cache_dir
    from embedtune.eval.datasets import load_eval_set
    from embedtune.models import AutoBiEncoder
    from embedtune.reranker import CrossEncoderReranker
    from embedtune.reranker.evaluate import evaluate_reranking

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    eval_set = load_eval_set(args.data, args.split)
    retriever = AutoBiEncoder.from_pretrained(args.retriever, device=device)
    reranker = CrossEncoderReranker.from_pretrained(args.reranker, device=device)
    result = evaluate_reranking(
        retriever,
        reranker,
        eval_set,
        top_k=args.top_k,
        batch_size=args.batch_size,
        rerank_batch_size=args.rerank_batch_size,
        bf16=args.bf16,
        cache_dir=args.cache_dir or default_cache_dir(),
        max_length=args.max_length,
        fusion_weight=args.fusion_weight,
    )
    print(f"{eval_set.name} ({args.split}): {result.num_queries} queries, reranking the top {args.top_k}\n")
    print(result.table())
    if result.fused:
        b, f = result.retriever["ndcg@10"], result.fused["ndcg@10"]
        print(f"| ndcg@10 fused (w={args.fusion_weight}) | {b:.4f} | {f:.4f} | {f - b:+.4f} | {f / b:.3f}x |")
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(
            json.dumps(
                {
                    "retriever": result.retriever,
                    "reranked": result.reranked,
                    "gain": result.gain,
                    "fused": result.fused,
                    "top_k": args.top_k,
                    "timings": result.timings,
                },
                indent=2,
            )
        )
    return 0
