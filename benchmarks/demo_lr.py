"""Choose the demo's LoRA learning rate on a validation split carved from its *training* data.

Not a test. ``make demo`` evaluates on the held-out ``scifact-mini`` test split, so a setting tried
there and kept would be chosen on the test set. This script keeps the test split out of the choice:

1. it carves a validation split from ``data/scifact-mini/train.json`` with ``carve_heldout`` (the split
   ``embedtune finetune`` makes: no shared positive document and no near-identical query between the
   two sides), writes the remaining examples as a corpus-ID JSON and the validation queries as a BEIR
   folder over the whole training corpus;
2. it runs ``embedtune demo`` — the real planner, on this machine, with its 10-minute budget — once per
   learning rate, training on the train side and evaluating before/after on the validation side. The
   evaluation is fixed on the command line (``--eval-docs``, ``--eval-max-length``), so every arm
   searches the same documents at the same length: left to the planner it would follow each run's
   speed measurement, and the scores of two arms would not compare;
3. it prints one row per learning rate: the validation NDCG@10 before and after, the gain, the steps
   the plan fitted and the wall time.

Usage::

    python benchmarks/demo_lr.py --lrs 3e-4 6e-4 1.2e-3

One seed per rate (a run is the whole 10-minute job); the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import recorded  # noqa: E402

from embedtune.finetune.split import carve_heldout  # noqa: E402

DATA = REPO / "data" / "scifact-mini"


def carve(folder: Path, fraction: float, seed: int) -> tuple[Path, Path, str]:
    """Write ``folder/train.json`` (the train side) and ``folder/validation`` (BEIR); returns both + a line."""
    raw = json.loads((DATA / "train.json").read_text(encoding="utf-8"))
    rows = raw["data"]
    split = carve_heldout(
        [r["question"] for r in rows],
        [[d["id"] for d in r["pos_doc"]] for r in rows],
        fraction=fraction,
        seed=seed,
    )
    (folder / "train_corpus").symlink_to(DATA / "train_corpus", target_is_directory=True)
    train = folder / "train.json"
    train.write_text(json.dumps({**raw, "data": [rows[i] for i in split.train]}), encoding="utf-8")
    val = folder / "validation"
    (val / "qrels").mkdir(parents=True)
    with (
        open(DATA / "train_corpus" / "docs.jsonl", encoding="utf-8") as src,
        open(val / "corpus.jsonl", "w", encoding="utf-8") as dst,
    ):
        for line in src:
            doc = json.loads(line)
            dst.write(json.dumps({"_id": doc["id"], "title": "", "text": doc["text"]}) + "\n")
    with (
        open(val / "queries.jsonl", "w", encoding="utf-8") as q,
        open(val / "qrels" / "test.tsv", "w", encoding="utf-8") as qrels,
    ):
        qrels.write("query-id\tcorpus-id\tscore\n")
        for i in split.heldout:
            qid = f"v{i}"
            q.write(json.dumps({"_id": qid, "text": rows[i]["question"]}) + "\n")
            for d in rows[i]["pos_doc"]:
                qrels.write(f"{qid}\t{d['id']}\t1\n")
    return train, val, split.describe()


def run_demo(recipe: Path, settings: list[str], log: Path) -> dict[str, float]:
    """``embedtune demo --recipe recipe SETTINGS``; the numbers its summary prints.

    Settings given on the command line are never re-planned: the learning rate stays as given (the
    planner scales only a recipe's), and the evaluation is the same in every arm.
    """
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "embedtune", "demo", "--recipe", str(recipe), *settings],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
    text = log.read_text(encoding="utf-8")
    if proc.returncode != 0:
        sys.exit(f"embedtune demo failed ({proc.returncode}) — see {log}:\n{text[-2000:]}")

    def num(pattern: str) -> float:
        m = re.search(pattern, text, re.MULTILINE)
        if m is None:
            sys.exit(f"cannot find {pattern!r} in the demo's output ({log})")
        return float(m.group(1))

    return {
        "before": num(r"^before\s+([0-9.]+)"),
        "after": num(r"^after\s+([0-9.]+)"),
        "gain": num(r"^gain\s+([+-][0-9.]+)"),
        "steps": num(r"^trained (\d+) steps"),
        "wall_s": num(r"^wall time: .*\((\d+) s\)"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 6e-4, 1.2e-3])
    ap.add_argument("--fraction", type=float, default=0.28, help="share of training queries held out")
    ap.add_argument("--seed", type=int, default=0, help="the split's seed")
    ap.add_argument(
        "--eval-max-length", type=int, default=128, help="validation document length, the same in every arm"
    )
    ap.add_argument(
        "--eval-docs",
        type=int,
        default=320,
        help="validation corpus: every relevant document plus fixed others up to this many, in every arm",
    )
    ap.add_argument("--recipe", default=str(REPO / "embedtune" / "recipes" / "smollm2_135m_demo.yaml"))
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    ap.add_argument("--tag", default="", help="results file suffix, so that a second sweep keeps the first")
    args = ap.parse_args()

    suffix = f"_{args.tag}" if args.tag else ""
    with (
        recorded("demo_lr", argv=sys.argv[1:], suffix=suffix),
        tempfile.TemporaryDirectory(prefix="demo_lr_") as tmp,
    ):
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        train, val, described = carve(work, args.fraction, args.seed)
        print(f"validation: {described} (from {DATA / 'train.json'}; the test split is not used)")
        base = yaml.safe_load(Path(args.recipe).read_text(encoding="utf-8"))
        rows = []
        for lr in args.lrs:
            recipe = {**base, "output_dir": str(work / f"run_lr{lr:g}")}
            recipe["data"] = {**base["data"], "datasets": [{"path": str(train)}]}
            recipe["validation"] = {**base["validation"], "data": str(val)}
            path = work / f"recipe_lr{lr:g}.yaml"
            path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
            t0 = time.perf_counter()
            fixed = [
                f"validation.max_length={args.eval_max_length}",
                f"validation.max_corpus={args.eval_docs}",
            ]
            r = run_demo(path, [f"optimizer.lr={lr:g}", *fixed], work / f"demo_lr{lr:g}.log")
            rows.append((lr, r))
            print(
                f"lr {lr:g}: {r['before']:.4f} -> {r['after']:.4f} ({r['gain']:+.4f}), "
                f"{r['steps']:.0f} steps, {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
        print()
        print("embedtune demo (SmolLM2-135M, LoRA, its own plan for this machine), validation split carved")
        print(
            f"from scifact-mini train, {args.eval_docs} documents at {args.eval_max_length} tokens in every "
            "arm; one seed per learning rate"
        )
        print(f"{'lr':>8} {'before':>8} {'after':>8} {'gain':>8} {'steps':>6} {'wall s':>7}")
        for lr, r in rows:
            print(
                f"{lr:8.1e} {r['before']:8.4f} {r['after']:8.4f} {r['gain']:+8.4f} "
                f"{r['steps']:6.0f} {r['wall_s']:7.0f}"
            )
        best = max(rows, key=lambda x: x[1]["gain"])
        print(f"best on validation: lr {best[0]:g} ({best[1]['gain']:+.4f})")


if __name__ == "__main__":
    main()
