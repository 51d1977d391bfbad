"""Data-layer scale benchmark: load and validate a large corpus-ID data set; time and peak memory.

Generates, in a temporary folder, a corpus of ``--size`` documents (default 1,000,000; ~50 words each)
in a NeMo corpus folder and a corpus-ID JSON file with ``--size / 10`` queries (1 positive + 4
negatives each), then measures, each phase in a fresh subprocess (so peak RSS is that phase's own):

* ``baseline dict``: what a naive reader does: ``json.loads`` every line into ``{id: text}``.
* ``corpus: build cache``: the corpus folder with a cold cache: validates every line, writes the
  Arrow file and the sorted-ID index.
* ``corpus: open cached``: the same again: memory-maps the cache.
* ``full load + validation``: ``read_training_file`` (cached corpus): parses and checks every query
  record, resolves and checks every document reference.
* ``random access``: 100,000 ``corpus.text(i)`` and 10,000 ``index_of(id)`` on the mapped corpus.
* ``inline JSONL load``: the same number of queries as inline JSONL with 5 passages of text each.
* ``one bad line``: the corpus with a number as ``text`` on its last line: time to the exact
  ``file:line: text`` error (worst case: the fast Arrow reader gives up and the line-by-line reader
  reads the whole file again to name the line).

Usage::

    python benchmarks/data_load.py                 # 1,000,000 documents, 100,000 queries (~3 min)
    python benchmarks/data_load.py --size 100000   # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS_PER_DOC = 50


def generate(root: Path, size: int, seed: int = 0) -> tuple[Path, Path]:
    """Write ``corpus/docs.jsonl`` (+ metadata) and ``train.json``; returns (train.json, docs.jsonl)."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i:x}" for i in range(20_000)])
    folder = root / "corpus"
    folder.mkdir(parents=True)
    (folder / "merlin_metadata.json").write_text(json.dumps({"class": "TextQADataset", "corpus_id": "big"}))
    docs = folder / "docs.jsonl"
    with open(docs, "w", encoding="utf-8") as f:
        for start in range(0, size, 10_000):
            n = min(10_000, size - start)
            words = vocab[rng.integers(0, len(vocab), size=(n, WORDS_PER_DOC))]
            f.write(
                "".join(
                    f'{{"id": "doc{start + i}", "text": "{" ".join(row)}"}}\n' for i, row in enumerate(words)
                )
            )
    n_q = max(1, size // 10)
    picks = rng.integers(0, size, size=(n_q, 5))
    train = root / "train.json"
    with open(train, "w", encoding="utf-8") as f:
        f.write('{"corpus": [{"path": "corpus"}],\n "data": [\n')
        for q in range(n_q):
            row = picks[q]
            pos, negs = int(row[0]), [int(x) for x in dict.fromkeys(row[1:].tolist()) if x != row[0]]
            rec = {
                "question_id": f"q{q}",
                "question": " ".join(vocab[rng.integers(0, len(vocab), size=8)]),
                "corpus_id": "big",
                "pos_doc": [{"id": f"doc{pos}"}],
                "neg_doc": [{"id": f"doc{n}"} for n in negs],
            }
            f.write(("," if q else "") + json.dumps(rec) + "\n")
        f.write("]}\n")
    # The same number of queries as inline JSONL: 5 passages of text per line (fresh random text).
    with open(root / "inline.jsonl", "w", encoding="utf-8") as f:
        for start in range(0, n_q, 10_000):
            n = min(10_000, n_q - start)
            words = vocab[rng.integers(0, len(vocab), size=(n, 5, WORDS_PER_DOC))]
            for i in range(n):
                passages = [" ".join(p) for p in words[i]]
                rec = {
                    "question_id": f"q{start + i}",
                    "query": passages[0][:60],
                    "pos_doc": passages[0],
                    "neg_doc": passages[1:],
                }
                f.write(json.dumps(rec) + "\n")
    return train, docs


# ---------------------------------------------------------------------- phases (run in subprocesses)


def _phase(name: str, train: str, docs: str, cache: str) -> dict:
    t0 = time.perf_counter()
    c0 = time.process_time()
    out: dict = {}
    if name == "baseline dict":
        table = {}
        with open(docs, encoding="utf-8") as f:
            for line in f:
                obj = json.loads(line)
                table[obj["id"]] = obj["text"]
        out["rows"] = len(table)
    elif name in ("corpus: build cache", "corpus: open cached"):
        from embedtune.data.corpus import Corpus

        out["rows"] = len(Corpus.from_folder(Path(docs).parent, cache_dir=cache))
    elif name == "full load + validation":
        from embedtune.data.formats import read_training_file

        data = read_training_file(train, cache_dir=cache)
        out["rows"] = len(data.corpus)
        out["queries"] = len(data)
    elif name == "inline JSONL load":
        from embedtune.data.formats import read_training_file

        data = read_training_file(Path(train).parent / "inline.jsonl", cache_dir=cache)
        out["rows"] = len(data.corpus)
    elif name == "random access":
        from embedtune.data.formats import read_training_file

        data = read_training_file(train, cache_dir=cache)
        corpus = data.corpus
        t0, c0 = time.perf_counter(), time.process_time()  # access only
        rng = np.random.default_rng(1)
        rows = rng.integers(0, len(corpus), size=100_000)
        total = sum(len(corpus.text(int(i))) for i in rows)
        ids = [f"doc{int(i)}" for i in rng.integers(0, len(corpus), size=10_000)]
        assert all(corpus.index_of(d) == int(d[3:]) for d in ids)
        out["rows"] = total
    elif name == "one bad line":
        from embedtune.data.formats import read_training_file
        from embedtune.data.problems import DataValidationError

        try:
            read_training_file(train, cache_dir=cache)
        except DataValidationError as exc:
            out["error"] = str(exc.problems[0])[:120]
        else:
            raise AssertionError("the bad line was not reported")
    out["seconds"] = time.perf_counter() - t0
    out["cpu_seconds"] = time.process_time() - c0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_phase(name: str, train: Path, docs: Path, cache: Path) -> dict:
    """Run one phase in a fresh interpreter so that its peak RSS is its own."""
    root = str(Path(__file__).resolve().parents[1])
    code = (
        f"import json, sys; sys.path.insert(0, {root!r}); from benchmarks.data_load import _phase; "
        f"print(json.dumps(_phase({name!r}, {str(train)!r}, {str(docs)!r}, {str(cache)!r})))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"phase {name!r} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from _machine import header  # every table says which machine (CPU model, AMX / avx512_bf16) it came from

    print(header(measure=False)[1], flush=True)
    parser = argparse.ArgumentParser(description="Time and memory of loading a large corpus-ID data set.")
    parser.add_argument("--size", type=int, default=1_000_000, help="documents (queries = size / 10)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files (prints where)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="embedtune-bench-"))
    try:
        t0 = time.perf_counter()
        train, docs = generate(root, args.size)
        gen_s = time.perf_counter() - t0
        size_mb = docs.stat().st_size / 2**20
        cache = root / "cache"
        print(
            f"generated {args.size:,} documents ({size_mb:,.0f} MB JSONL) and {max(1, args.size // 10):,} queries in {gen_s:.1f} s"
        )
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n")
        rows = []
        for name in (
            "baseline dict",
            "corpus: build cache",
            "corpus: open cached",
            "full load + validation",
            "random access",
            "inline JSONL load",
        ):
            rows.append((name, run_phase(name, train, docs, cache)))
        # A wrong type on the last line: the fast reader gives up, the slow one must name that line.
        with open(docs, "ab") as f:
            f.write(b'{"id": "bad", "text": 5}\n')
        shutil.rmtree(cache)
        rows.append(("one bad line", run_phase("one bad line", train, docs, cache)))

        base = rows[0][1]
        print("| phase | wall s | CPU s | peak RSS (MB) | RSS vs baseline | what |")
        print("|---|---:|---:|---:|---:|---|")
        notes = {
            "baseline dict": "naive: json.loads every corpus line into a dict {id: text}",
            "corpus: build cache": "validate every line, write Arrow + sorted-ID index (cold cache)",
            "corpus: open cached": "memory-map the cache (what every later run does)",
            "full load + validation": "read_training_file: corpus + parse and check all queries and references",
            "random access": "100,000 corpus.text(i) + 10,000 index_of(id)",
            "inline JSONL load": "the queries as inline JSONL, 5 passages of text each: validate, dedupe, write Arrow",
            "one bad line": "",
        }
        for name, r in rows:
            note = notes[name] or f"reports `{r.get('error', '')}...`"
            print(
                f"| {name} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_rss_mb']:,.0f} | "
                f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x | {note} |"
            )
    finally:
        if args.keep:
            print(f"\nfiles kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
