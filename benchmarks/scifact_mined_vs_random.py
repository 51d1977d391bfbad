"""SciFact: mined vs random negatives for a MiniLM fine-tune, and a reranker on MiniLM's top-100.

LONG-RUNNING (minutes on a GPU; about an hour on 2 CPU cores with the defaults — use ``--epochs 1
--max-length 128 --bf16`` there). Not a test; prints tables and writes ``results.json``.

What it does, all in one process so that every number shares one baseline:

1. evaluate the base model on SciFact test (NDCG@10 etc., full corpus, exact search) and keep its
   top-100 run;
2. mine negatives for the train split with the base model (``embedtune.mining``: rank window,
   positive-aware margin) and write them as corpus-ID JSON;
3. fine-tune the base model twice per seed, identical except for the negatives: **mined** (sampled
   from the mined list) vs **random** (random corpus documents that are not positives) — same seed,
   steps, batch, number of negatives, learning rate; evaluate each on test;
4. train a cross-encoder reranker (``embedtune.reranker.train``) on the train split with the mined
   negatives and rerank the base model's top-100 on test; report the gain.

The bi-encoder loop here is deliberately minimal (InfoNCE from ``embedtune.training.loss``, AdamW +
warmup/linear decay from ``embedtune.training.optim``), so that the only difference between the two
runs is the negatives.

Caveat printed with the results: SciFact's train and test splits share one corpus and 181 of the 283
test-relevant documents are also train positives.

Usage::

    python benchmarks/scifact_mined_vs_random.py --data ../shared/data/scifact --model minilm --bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def finetune(
    model: Any,
    data: Any,
    negatives: list[list[int]] | None,
    *,
    seed: int,
    epochs: int,
    batch_size: int,
    n_neg: int,
    lr: float,
    temperature: float,
    max_length: int,
    query_max_length: int,
    bf16: bool,
) -> dict[str, float]:
    """Contrastive fine-tune; ``negatives=None`` draws random corpus documents instead of mined ones."""
    from embedtune.training.loss import info_nce
    from embedtune.training.optim import LRSchedulerConfig, OptimizerConfig, build_optimizer, build_scheduler

    device = model.device
    torch.manual_seed(seed)
    steps_per_epoch = len(data) // batch_size
    total = steps_per_epoch * epochs
    opt = build_optimizer(model, OptimizerConfig(lr=lr, weight_decay=0.01))
    sched = build_scheduler(opt, LRSchedulerConfig(name="linear", warmup_ratio=0.1), total)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if bf16
        else torch.autocast(device.type, enabled=False)
    )
    n_docs = len(data.corpus)
    model.train()
    t0 = time.perf_counter()
    losses = []
    for epoch in range(epochs):
        order = list(range(len(data)))
        random.Random(seed * 7919 + epoch).shuffle(order)
        for step in range(steps_per_epoch):
            # Same RNG stream for both arms: positives and the order are identical; only negatives differ.
            rng = random.Random(f"{seed}-{epoch}-{step}")
            idx = order[step * batch_size : (step + 1) * batch_size]
            rows: list[int] = []
            for i in idx:
                pos = data.positives(i).tolist()
                rows.append(rng.choice(pos))
                if negatives is not None:
                    pool = negatives[i]
                    negs = rng.sample(pool, n_neg) if len(pool) >= n_neg else list(pool)
                else:
                    negs = []
                while len(negs) < n_neg:  # random arm, or a mined list that came up short
                    r = rng.randrange(n_docs)
                    if r not in pos and r not in negs:
                        negs.append(r)
                rows.extend(negs)
            qf = model.tokenize([data.queries[i] for i in idx], "query", max_length=query_max_length)
            pf = model.tokenize(data.corpus.texts(rows), "document", max_length=max_length)
            with autocast:
                q = model(**{k: v.to(device) for k, v in qf.items()})
                p = model(**{k: v.to(device) for k, v in pf.items()})
            loss = info_nce(
                q.float(),
                p.float(),
                n_passages=1 + n_neg,
                temperature=temperature,
                in_batch_negatives=True,
                doc_ids=torch.as_tensor(rows, dtype=torch.long, device=device),
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
    model.eval()
    return {"steps": total, "train_s": time.perf_counter() - t0, "final_loss": float(np.mean(losses[-10:]))}


def main() -> int:
    from _machine import header  # every table says which machine (CPU model, AMX / avx512_bf16) it came from

    print(header(measure=False)[1], flush=True)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/scifact")
    ap.add_argument("--model", default="minilm", help="bi-encoder to fine-tune (and to mine with)")
    ap.add_argument("--reranker-model", default=None, help="cross-encoder backbone (default: --model)")
    ap.add_argument("--out", default="outputs/scifact_mining")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; both arms run per seed")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-neg", type=int, default=3, help="hard negatives per query per step (both arms)")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--query-max-length", type=int, default=64)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--mine-num", type=int, default=10, help="negatives mined per query")
    ap.add_argument("--mine-range", default="0:100")
    ap.add_argument("--margin", type=float, default=0.95)
    ap.add_argument("--margin-type", default="perc")
    ap.add_argument("--reranker-epochs", type=int, default=2)
    ap.add_argument("--reranker-group", type=int, default=8)
    ap.add_argument("--reranker-batch", type=int, default=16)
    ap.add_argument("--reranker-lr", default="3e-5", help="comma-separated: one reranker per value")
    ap.add_argument(
        "--fusion-weight", type=float, default=0.5, help="reranker share in the fused run (fixed a priori)"
    )
    ap.add_argument("--reranker-max-length", type=int, default=256)
    ap.add_argument("--rerank-top-k", type=int, default=100)
    ap.add_argument("--skip-reranker", action="store_true")
    ap.add_argument("--skip-finetune", action="store_true")
    ap.add_argument("--max-test-queries", type=int, default=None, help="smoke runs only")
    ap.add_argument("--max-test-corpus", type=int, default=None, help="smoke runs only")
    ap.add_argument("--max-train-queries", type=int, default=None, help="smoke runs only")
    ap.add_argument("--device", default=None)
    ap.add_argument(
        "--cache-dir", default=None, help="embedding cache shared by the base evaluation and mining"
    )
    args = ap.parse_args()

    from embedtune.data.formats import read_training_file
    from embedtune.eval.datasets import load_eval_set
    from embedtune.eval.retrieval import run_evaluation
    from embedtune.mining import MiningSettings, mine_hard_negatives, parse_range, write_mined
    from embedtune.models import AutoBiEncoder

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    log(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    train = read_training_file(args.data, split="train")
    if args.max_train_queries:
        train = _head(train, args.max_train_queries)
    test = load_eval_set(args.data, "test")
    if args.max_test_queries or args.max_test_corpus:
        test = test.subset(args.max_test_queries, args.max_test_corpus, seed=0)
    log(
        f"train: {len(train)} queries, corpus {len(train.corpus)}; test: {len(test.queries)} queries, corpus {len(test.corpus)}"
    )
    results: dict[str, Any] = {"args": vars(args), "device": device}
    if device == "cuda":
        results["gpu"] = torch.cuda.get_device_name(0)

    def load(name: str) -> Any:
        return AutoBiEncoder.from_pretrained(name, max_length=args.max_length, device=device, dtype="float32")

    def evaluate(model: Any, top_k: int = 100) -> Any:
        return run_evaluation(
            model,
            test,
            (1, 10, 100),
            batch_size=128,
            bf16=args.bf16,
            top_k=top_k,
            max_length=args.max_length,
            cache_dir=args.cache_dir,
        )

    # 1. base model
    base = load(args.model)
    t = time.perf_counter()
    base_res = evaluate(base, args.rerank_top_k)
    results["base"] = base_res.metrics
    log(f"base NDCG@10 {base_res.metrics['ndcg@10']:.4f} ({time.perf_counter() - t:.0f}s)")

    # 2. mining
    s, e = parse_range(args.mine_range)
    settings = MiningSettings(
        num_negatives=args.mine_num,
        range_start=s,
        range_end=e,
        margin=args.margin,
        margin_type=args.margin_type,
    )
    mined = mine_hard_negatives(
        base,
        train,
        settings,
        batch_size=128,
        bf16=args.bf16,
        max_length=args.max_length,
        query_max_length=args.query_max_length,
        cache_dir=args.cache_dir,
    )
    write_mined(train, mined, out / "scifact_train_mined.json", input_path=args.data)
    results["mining"] = {
        "settings": dataclasses.asdict(settings),
        **mined.stats,
        "fingerprint": mined.info["fingerprint"],
    }
    neg_lists = [ex.negatives for ex in mined.examples]
    log(f"mined: {mined.stats}")

    # 3. mined vs random fine-tunes
    seeds = [int(x) for x in args.seeds.split(",")]
    runs = []
    if not args.skip_finetune:
        for seed in seeds:
            for arm in ("mined", "random"):
                model = load(args.model)
                info = finetune(
                    model,
                    train,
                    neg_lists if arm == "mined" else None,
                    seed=seed,
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    n_neg=args.n_neg,
                    lr=args.lr,
                    temperature=args.temperature,
                    max_length=args.max_length,
                    query_max_length=args.query_max_length,
                    bf16=args.bf16,
                )
                res = evaluate(model)
                runs.append(
                    {
                        "seed": seed,
                        "arm": arm,
                        **info,
                        **{k: res.metrics[k] for k in ("ndcg@10", "recall@100", "mrr@10")},
                    }
                )
                log(f"seed {seed} {arm}: NDCG@10 {res.metrics['ndcg@10']:.4f} ({info['train_s']:.0f}s train)")
                del model
                if device == "cuda":
                    torch.cuda.empty_cache()
    results["finetune"] = runs

    # 4. reranker
    if not args.skip_reranker:
        from embedtune.reranker.evaluate import evaluate_reranking
        from embedtune.reranker.model import CrossEncoderReranker
        from embedtune.reranker.train import train_reranker
        from embedtune.training.config import load_train_config

        flat = (
            np.concatenate([np.asarray(n, dtype=np.int64) for n in neg_lists])
            if neg_lists
            else np.zeros(0, np.int64)
        )
        offsets = np.concatenate([[0], np.cumsum([len(n) for n in neg_lists])]).astype(np.int64)
        train_mined = dataclasses.replace(train, neg_rows=flat, neg_offsets=offsets)
        results["rerank"] = []
        for lr in [float(x) for x in args.reranker_lr.split(",")]:
            cfg = load_train_config(
                {
                    "recipe": "rerank",
                    "model": {
                        "name_or_path": args.reranker_model or args.model,
                        "max_length": args.reranker_max_length,
                    },
                    "data": {"datasets": [{"path": str(args.data)}], "n_passages": args.reranker_group},
                    "output_dir": str(out / f"reranker_lr{lr:g}"),
                    "optimizer": {"lr": lr},
                    "lr_scheduler": {"warmup_ratio": 0.1},
                    "step_scheduler": {
                        "global_batch_size": args.reranker_batch,
                        "num_epochs": args.reranker_epochs,
                        "log_every_steps": 100,
                    },
                    "bf16": args.bf16,
                    "seed": seeds[0],
                    "device": "cuda" if device == "cuda" else "cpu",
                    "logging": {"progress_bar": False, "plot": False, "tensorboard": False},
                }
            )
            rr = train_reranker(cfg, data=[train_mined])
            log(
                f"reranker lr={lr:g} trained: {rr.state.step} steps, loss {rr.losses[-1]:.4f}, "
                f"{rr.state.elapsed_s:.0f}s"
            )
            reranker = CrossEncoderReranker.from_pretrained(rr.model_dir, device=device)
            ev = evaluate_reranking(
                base,
                reranker,
                test,
                top_k=args.rerank_top_k,
                run=base_res.run,
                rerank_batch_size=128,
                bf16=args.bf16,
                fusion_weight=args.fusion_weight,
            )
            results["rerank"].append(
                {
                    "lr": lr,
                    "epochs": args.reranker_epochs,
                    "group": args.reranker_group,
                    "top_k": args.rerank_top_k,
                    "retriever": ev.retriever,
                    "reranked": ev.reranked,
                    "fused": ev.fused,
                    "fusion_weight": args.fusion_weight,
                    "gain": ev.gain,
                    "train_steps": rr.steps,
                    "train_s": rr.elapsed_s,
                    "rerank_s": ev.timings["rerank"],
                }
            )
            log(
                f"rerank lr={lr:g}: NDCG@10 {ev.retriever['ndcg@10']:.4f} -> {ev.reranked['ndcg@10']:.4f} "
                f"(fused w={args.fusion_weight}: {ev.fused['ndcg@10']:.4f})"
            )
            print(
                f"\n## Reranker (lr {lr:g}, {args.reranker_epochs} epochs, group {args.reranker_group}) on the base "
                f"model's top-{args.rerank_top_k}, SciFact test\n"
            )
            print(ev.table())
            b = ev.retriever["ndcg@10"]
            print(
                f"| ndcg@10 fused (w={args.fusion_weight}) | {b:.4f} | {ev.fused['ndcg@10']:.4f} | "
                f"{ev.fused['ndcg@10'] - b:+.4f} | {ev.fused['ndcg@10'] / b:.3f}x |"
            )

    # Tables
    if runs:
        print("\n## MiniLM fine-tuned on SciFact train: mined vs random negatives (test NDCG@10)\n")
        b = results["base"]["ndcg@10"]
        print(f"base (no fine-tune): {b:.4f}\n")
        print("| seed | arm | NDCG@10 | vs base | Recall@100 | MRR@10 | steps | train s |")
        print("|---|---|---|---|---|---|---|---|")
        for r in runs:
            print(
                f"| {r['seed']} | {r['arm']} | {r['ndcg@10']:.4f} | {r['ndcg@10'] / b:.3f}x | {r['recall@100']:.4f} | "
                f"{r['mrr@10']:.4f} | {r['steps']} | {r['train_s']:.0f} |"
            )
        m = np.mean([r["ndcg@10"] for r in runs if r["arm"] == "mined"])
        rnd = np.mean([r["ndcg@10"] for r in runs if r["arm"] == "random"])
        print(
            f"\nmean over seeds: mined {m:.4f}, random {rnd:.4f}, mined - random {m - rnd:+.4f} ({m / rnd:.3f}x)"
        )
        results["summary"] = {"mined_mean": m, "random_mean": rnd, "diff": m - rnd}
    print(
        "\nNote: SciFact train and test share one corpus; 181 of the 283 test-relevant documents are also "
        "train positives."
    )
    results["total_s"] = time.perf_counter() - t_all
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "results.json").write_text(json.dumps(results, indent=2, default=float))
    log(f"done in {results['total_s']:.0f}s")
    return 0


def _head(data: Any, n: int) -> Any:
    """The first ``n`` examples of a RetrievalData (smoke runs)."""
    n = min(n, len(data))
    return dataclasses.replace(
        data,
        query_ids=data.query_ids[:n],
        queries=data.queries[:n],
        pos_offsets=data.pos_offsets[: n + 1],
        pos_rows=data.pos_rows[: data.pos_offsets[n]],
        neg_offsets=data.neg_offsets[: n + 1],
        neg_rows=data.neg_rows[: data.neg_offsets[n]],
        lines=data.lines[:n],
        groups=data.groups[:n],
    )


if __name__ == "__main__":
    sys.exit(main())
