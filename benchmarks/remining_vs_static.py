"""Re-mined vs static mined vs random negatives, same budget, several seeds, with compare's p-values.

Not a test. Every arm runs the production loop (``embedtune train``) on the same data, model, steps,
batch, learning rate and number of negatives; only the negatives differ:

* **random**   -- no negatives in the file; ``fill_negatives: random`` draws random corpus documents;
* **static**   -- negatives mined once, before training, with the base model (``embedtune mine``);
* **remine**   -- the same initial mined file, re-mined with the current weights every
  ``--refresh-every`` steps (the recipe's ``mining:`` block).

Each final model is evaluated with ``embedtune eval --output`` (per-query metrics) on the held-out
``scifact-mini`` test split; per arm the per-query values are averaged over the seeds, and the arms are
compared pairwise with ``embedtune compare`` (paired randomisation + paired bootstrap over queries).
Per-seed means are printed as well. Re-mining costs extra encoding time: the wall time of each arm is
reported beside its score, so "same budget" means the same optimizer steps, not the same seconds.

The training corpus is cut to the documents the chosen examples reference (their positives and BM25
negatives), so that a re-mining pass is short on a CPU; all arms use that corpus.

Usage (CPU, a small version: minutes per arm and seed)::

    python benchmarks/remining_vs_static.py --steps 24 --refresh-every 8 --queries 256 --seeds 0 1 2

The result of a run goes to ``--out`` (``summary.json``, one folder per run); the printed table says
which machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def cpu_line() -> str:
    """The machine (CPU model, AMX / avx512_bf16 flags, threads) as every benchmark prints it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _machine import header

    return header(measure=False)[1]


def run(cmd: list[str], log: Path) -> float:
    """Run an embedtune command, its output into ``log``; returns the wall seconds."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "embedtune.cli", *cmd], stdout=f, stderr=subprocess.STDOUT, env=env
        )
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): embedtune {' '.join(cmd)} — see {log}")
    return time.perf_counter() - t0


def subset_files(src: Path, out_dir: Path, n: int) -> tuple[Path, Path]:
    """The first ``n`` examples of a corpus-ID file over a corpus cut to the documents they reference
    (their positives and negatives), once with and once without negatives.

    A small corpus keeps each re-mining pass short on a CPU; every arm searches the same corpus.
    """
    doc = json.loads(src.read_text())
    (entry,) = doc["corpus"]
    folder = src.parent / entry["path"]
    rows = doc["data"][:n]
    keep = {d["id"] for r in rows for d in r["pos_doc"] + r["neg_doc"]}
    corpus_dir = out_dir / "corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    (corpus_dir / "merlin_metadata.json").write_text((folder / "merlin_metadata.json").read_text())
    lines = [x for f in sorted(folder.glob("*.jsonl")) for x in f.read_text().splitlines() if x.strip()]
    (corpus_dir / "docs.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["id"] in keep))
    with_neg = out_dir / "train_subset.json"
    with_neg.write_text(json.dumps({"corpus": [{"path": "corpus"}], "data": rows}))
    no_neg = out_dir / "train_random.json"
    no_neg.write_text(
        json.dumps({"corpus": [{"path": "corpus"}], "data": [{**r, "neg_doc": []} for r in rows]})
    )
    return with_neg, no_neg


def recipe(args: argparse.Namespace, data: Path, out: Path, seed: int, remine: bool) -> Path:
    cfg = {
        "output_dir": str(out),
        "seed": seed,
        "bf16": args.bf16,
        "model": {"name_or_path": args.model, "max_length": args.max_length},
        "data": {
            "datasets": [{"path": str(data)}],
            "n_passages": args.n_passages,
            "q_max_len": 64,
            "p_max_len": args.max_length,
            "fill_negatives": "random",
        },
        "loss": {"temperature": 0.05, "in_batch_negatives": True},
        "optimizer": {"lr": args.lr},
        "lr_scheduler": {"name": "linear", "warmup_steps": max(1, args.steps // 10)},
        "step_scheduler": {
            "global_batch_size": args.batch_size,
            "max_steps": args.steps,
            "ckpt_every_steps": args.steps,
        },
        "checkpoint": {"keep_last": 1},
        "logging": {"progress_bar": False, "tensorboard": False, "plot": False},
    }
    if remine:
        cfg["mining"] = {
            "refresh_every_steps": args.refresh_every,
            "num_negatives": args.num_negatives,
            "range_start": 0,
            "range_end": 50,
            "margin": None if args.margin == "none" else float(args.margin),
            "batch_size": 64,
            "max_length": args.max_length,
        }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--train", default=str(REPO / "data/scifact-mini/train.json"))
    p.add_argument("--test", default=str(REPO / "data/scifact-mini/test"))
    p.add_argument("--queries", type=int, default=256, help="training examples used")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-passages", type=int, default=2)
    p.add_argument("--num-negatives", type=int, default=4)
    p.add_argument("--refresh-every", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument(
        "--margin",
        default="0.95",
        help="positive-aware margin (perc) for static and re-mining, or 'none' (a random tiny model scores "
        "every document within 5%% of the positive, so the margin would leave no negative)",
    )
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/bench_remining")
    args = p.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(cpu_line(), flush=True)
    bf = ["--bf16"] if args.bf16 else []
    base, random_file = subset_files(Path(args.train), out, args.queries)
    mined = out / "train_mined.json"
    margin = ["--no-margin"] if args.margin == "none" else ["--margin", args.margin]
    t_mine = run(
        [
            "mine",
            "--model",
            args.model,
            "--data",
            str(base),
            "--output",
            str(mined),
            "--num-negatives",
            str(args.num_negatives),
            "--range",
            "0:50",
            *margin,
            "--max-length",
            str(args.max_length),
            *bf,
        ],
        out / "mine.log",
    )
    n_mined = sum(len(r["neg_doc"]) for r in json.loads(mined.read_text())["data"])
    if n_mined == 0:
        sys.exit(f"mining with the base model kept no negative (see {out / 'mine.log'}); try --margin none")
    print(f"static mining with the base model: {t_mine:.0f}s", flush=True)
    eval_cmd = [
        "eval",
        "--data",
        args.test,
        "--max-length",
        str(args.max_length),
        "--ci-resamples",
        "2000",
        *bf,
    ]
    run([*eval_cmd, "--model", args.model, "--output", str(out / "base.json")], out / "base_eval.log")

    arms = {"random": (random_file, False), "static": (mined, False), "remine": (mined, True)}
    results: dict[str, dict] = {a: {"seeds": {}} for a in arms}
    for seed in args.seeds:
        for arm, (data, remine) in arms.items():
            run_dir = out / f"{arm}_s{seed}"
            t_train = run(
                ["train", str(recipe(args, data, run_dir, seed, remine))], out / f"{arm}_s{seed}.log"
            )
            model_dir = next(p for p in (run_dir / "model", run_dir / "final") if p.is_dir())
            ev = out / f"{arm}_s{seed}.json"
            run([*eval_cmd, "--model", str(model_dir), "--output", str(ev)], out / f"{arm}_s{seed}_eval.log")
            m = json.loads(ev.read_text())
            results[arm]["seeds"][seed] = {"ndcg@10": m["metrics"]["ndcg@10"], "train_s": round(t_train, 1)}
            print(
                f"seed {seed} {arm:7s} NDCG@10 {m['metrics']['ndcg@10']:.4f}  train {t_train:.0f}s",
                flush=True,
            )

    # Seed-averaged per-query metrics per arm, then paired tests between arms.
    for arm in arms:
        per_seed = [json.loads((out / f"{arm}_s{s}.json").read_text())["per_query"] for s in args.seeds]
        avg = {
            q: {k: sum(ps[q][k] for ps in per_seed) / len(per_seed) for k in per_seed[0][q]}
            for q in per_seed[0]
        }
        (out / f"{arm}_avg.json").write_text(
            json.dumps({"model": f"{arm} (mean of seeds {args.seeds})", "per_query": avg})
        )
    base_ndcg = json.loads((out / "base.json").read_text())["metrics"]["ndcg@10"]
    print("\n" + cpu_line())
    print(
        f"{args.model}, {args.queries} training queries, {args.steps} steps x batch {args.batch_size}, "
        f"n_passages {args.n_passages}, refresh every {args.refresh_every} steps; test: {args.test}"
    )
    print(f"base model NDCG@10 {base_ndcg:.4f}")
    print(f"{'arm':8s} " + " ".join(f"seed{s:<3d}" for s in args.seeds) + "   mean    train_s(mean)  vs base")
    for arm in arms:
        vals = [results[arm]["seeds"][s]["ndcg@10"] for s in args.seeds]
        secs = [results[arm]["seeds"][s]["train_s"] for s in args.seeds]
        mean = sum(vals) / len(vals)
        results[arm]["mean_ndcg@10"] = mean
        print(
            f"{arm:8s} "
            + " ".join(f"{v:.4f} " for v in vals)
            + f"  {mean:.4f}  {sum(secs) / len(secs):8.0f}      "
            f"{mean / base_ndcg:.3f}x"
        )
    comparisons = {}
    for a, b in (("remine", "static"), ("remine", "random"), ("static", "random")):
        cmp_out = out / f"compare_{a}_vs_{b}.json"
        run(
            [
                "compare",
                str(out / f"{a}_avg.json"),
                str(out / f"{b}_avg.json"),
                "--metrics",
                "ndcg@10",
                "recall@10",
                "--output",
                str(cmp_out),
            ],
            out / f"compare_{a}_vs_{b}.log",
        )
        print(f"\n== {a} vs {b} (seed-averaged per-query values) ==")
        print((out / f"compare_{a}_vs_{b}.log").read_text().strip())
        comparisons[f"{a}_vs_{b}"] = json.loads(cmp_out.read_text())["metrics"]
    (out / "summary.json").write_text(
        json.dumps(
            {
                "machine": cpu_line(),
                "args": vars(args),
                "base_ndcg@10": base_ndcg,
                "arms": results,
                "comparisons": comparisons,
            },
            indent=2,
        )
    )
    print(f"\nsummary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
