"""``embedtune demo``: the main job — fine-tune a bundled model on the bundled data, before/after scores.

By default: SmolLM2-135M-Instruct converted to a bidirectional encoder, LoRA, trained on
``data/scifact-mini`` (SciFact subset) and evaluated on its held-out test split before and after
(NDCG@10, Recall@10); the merged model is saved. ``--recipe minilm_demo`` does the same for MiniLM.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

HELP = "the main job: fine-tune the bundled SmolLM2-135M (LoRA) on bundled data, evaluate before/after"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments: ``--recipe`` and overrides."""
    parser.add_argument(
        "--recipe",
        default="smollm2_135m_demo",
        help="a shipped recipe name or YAML file (default: smollm2_135m_demo; also: minilm_demo)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="overrides, as for `embedtune train`"
    )


def _bundled_path(path: str) -> str:
    """Relative data paths resolve against the current folder, else against the source checkout."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return path
    root = Path(__file__).resolve().parents[2]  # the repository root of a source checkout
    return str(root / p) if (root / p).exists() else path


def run(args: argparse.Namespace) -> int:
    """Train the demo recipe and print the before/after table; returns the training exit code."""
    from embedtune.training.config import load_train_config

    cfg = load_train_config(args.recipe, args.overrides)
    for ds in cfg.data.datasets:
        ds.path = _bundled_path(ds.path)
    if cfg.validation is not None:
        cfg.validation.data = _bundled_path(cfg.validation.data)
        cfg.validation.eval_at_start = True  # the "before" number

    ckpt_dir = cfg.checkpoint_dir
    if cfg.checkpoint.resume is None and ckpt_dir.is_dir():
        # A demo run is throwaway: start it afresh instead of refusing like `embedtune train` does.
        print(f"removing the previous demo run's checkpoints in {ckpt_dir}", flush=True)
        shutil.rmtree(ckpt_dir)

    from embedtune.training.monitor import read_metrics
    from embedtune.training.recipe import train

    t0 = time.perf_counter()
    print(
        f"embedtune demo: {cfg.model.name_or_path} on {', '.join(d.path for d in cfg.data.datasets)}",
        flush=True,
    )
    result = train(cfg)
    wall = time.perf_counter() - t0
    if result.exit_code != 0:
        return result.exit_code

    vals = [r for r in read_metrics(Path(cfg.output_dir) / "metrics.jsonl") if "val/ndcg@10" in r]
    print()
    print(
        f"model: {cfg.model.name_or_path}"
        + (f" + LoRA r={cfg.peft.r}" if cfg.peft else " (full fine-tuning)")
    )
    print(f"trained {result.state.step} steps ({result.stop_reason}), {result.state.examples_seen} examples")
    if cfg.validation is not None and len(vals) >= 2:
        before, after = vals[0], vals[-1]
        print(f"held-out evaluation: {cfg.validation.data}")
        print(f"{'':8} {'NDCG@10':>8} {'Recall@10':>10}")
        print(f"{'before':8} {before['val/ndcg@10']:8.4f} {before['val/recall@10']:10.4f}")
        print(f"{'after':8} {after['val/ndcg@10']:8.4f} {after['val/recall@10']:10.4f}")
        gain = after["val/ndcg@10"] - before["val/ndcg@10"]
        print(f"{'gain':8} {gain:+8.4f} {after['val/recall@10'] - before['val/recall@10']:+10.4f}")
        if gain <= 0:
            print("warning: no gain on the held-out split — check the recipe (lr, steps, data)")
    print(f"saved: {result.model_dir}")
    print(f"wall time: {wall / 60:.1f} min ({wall:.0f} s)")
    return 0
