"""Build ``data/scifact-mini`` (embedtune's bundled default data set) from BEIR SciFact.

Deterministic: the same input files give byte-identical output (fixed seed, sorted IDs), so the
shipped files can be rebuilt and audited::

    python data/build_scifact_mini.py /path/to/beir/scifact data/scifact-mini

What it writes (all text is SciFact's own; nothing is generated):

* ``test/`` — BEIR layout: every SciFact **test** query (300) with its qrels, and a 1,000-document
  corpus = all 283 test-relevant documents + 717 distractors drawn at random (seed 13) from the
  documents that are not positives of a kept training query.
* ``train.json`` + ``train_corpus/`` — corpus-ID JSON (NeMo AutoModel layout): the SciFact **train**
  queries *except* those whose positive documents are test-relevant (SciFact's splits share one
  corpus; 272 of 809 train queries touch a test-relevant document and are left out), with their
  positives and 7 BM25-mined negatives each, over a corpus that contains no test-corpus document.

Negatives: BM25 (k1 = 1.2, b = 0.75, lower-cased word tokens) over the training pool (every SciFact
document outside the test corpus); the 3 best-scoring non-positives are skipped, because SciFact's
judgements are sparse and the very top is where unjudged relevant documents hide; the next 7 are kept.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import random
import re
import sys
from pathlib import Path

SEED = 13
TEST_DOCS = 1000
NEGATIVES = 7
SKIP_TOP = 3
_TOKEN = re.compile(r"\w+")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            cols = line.rstrip("\r\n").split("\t")
            if cols[0] == "query-id" or len(cols) != 3:
                continue
            qrels.setdefault(cols[0], {})[cols[1]] = int(cols[2])
    return qrels


def doc_text(doc: dict) -> str:
    return f"{doc.get('title', '')} {doc['text']}".strip()


def bm25_top(queries: list[str], doc_ids: list[str], texts: list[str], k: int) -> list[list[str]]:
    """The ``k`` best BM25 documents for each query (ties broken by document ID, for determinism)."""
    k1, b = 1.2, 0.75
    postings: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    lengths = []
    for j, t in enumerate(texts):
        tf = collections.Counter(_TOKEN.findall(t.lower()))
        lengths.append(sum(tf.values()))
        for term, c in tf.items():
            postings[term].append((j, c))
    avg = sum(lengths) / len(lengths)
    n = len(texts)
    out = []
    for q in queries:
        scores: dict[int, float] = collections.defaultdict(float)
        for term in set(_TOKEN.findall(q.lower())):
            plist = postings.get(term)
            if not plist:
                continue
            idf = math.log(1 + (n - len(plist) + 0.5) / (len(plist) + 0.5))
            for j, c in plist:
                scores[j] += idf * c * (k1 + 1) / (c + k1 * (1 - b + b * lengths[j] / avg))
        ranked = sorted(scores.items(), key=lambda kv: (-round(kv[1], 9), doc_ids[kv[0]]))
        out.append([doc_ids[j] for j, _ in ranked[:k]])
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def build(src: Path, out: Path) -> dict[str, int]:
    corpus = {d["_id"]: d for d in read_jsonl(src / "corpus.jsonl")}
    queries = {q["_id"]: q["text"] for q in read_jsonl(src / "queries.jsonl")}
    test_qrels = read_qrels(src / "qrels" / "test.tsv")
    train_qrels = read_qrels(src / "qrels" / "train.tsv")

    test_relevant = {d for judged in test_qrels.values() for d, s in judged.items() if s > 0}
    test_query_texts = {queries[q].strip().lower() for q in test_qrels}
    # Leave out training queries that would teach the test answers (or repeat a test query).
    kept = sorted(
        (
            q
            for q, judged in train_qrels.items()
            if not ({d for d, s in judged.items() if s > 0} & test_relevant)
            and queries[q].strip().lower() not in test_query_texts
        ),
        key=int,
    )
    train_positive = {d for q in kept for d, s in train_qrels[q].items() if s > 0}

    # Test corpus: every test-relevant document + random distractors that no kept training query needs.
    rng = random.Random(SEED)
    candidates = sorted(set(corpus) - test_relevant - train_positive, key=int)
    distractors = rng.sample(candidates, TEST_DOCS - len(test_relevant))
    test_docs = sorted(test_relevant | set(distractors), key=int)

    # Training pool: everything outside the test corpus; negatives mined there by BM25.
    pool = sorted(set(corpus) - set(test_docs), key=int)
    top = bm25_top([queries[q] for q in kept], pool, [doc_text(corpus[d]) for d in pool], 40)
    data = []
    used = set()
    for q, ranked in zip(kept, top):
        pos = sorted((d for d, s in train_qrels[q].items() if s > 0), key=int)
        negs = [d for d in ranked if d not in pos][SKIP_TOP : SKIP_TOP + NEGATIVES]
        used.update(pos)
        used.update(negs)
        data.append(
            {
                "question_id": q,
                "question": queries[q],
                "corpus_id": "scifact_train",
                "pos_doc": [{"id": d} for d in pos],
                "neg_doc": [{"id": d} for d in negs],
            }
        )
    train_docs = sorted(used, key=int)

    out.mkdir(parents=True, exist_ok=True)
    (out / "test" / "qrels").mkdir(parents=True, exist_ok=True)
    write_jsonl(
        out / "test" / "corpus.jsonl",
        [{"_id": d, "title": corpus[d].get("title", ""), "text": corpus[d]["text"]} for d in test_docs],
    )
    write_jsonl(
        out / "test" / "queries.jsonl", [{"_id": q, "text": queries[q]} for q in sorted(test_qrels, key=int)]
    )
    with open(out / "test" / "qrels" / "test.tsv", "w", encoding="utf-8", newline="\n") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q in sorted(test_qrels, key=int):
            for d in sorted(test_qrels[q], key=int):
                f.write(f"{q}\t{d}\t{test_qrels[q][d]}\n")
    (out / "train_corpus").mkdir(parents=True, exist_ok=True)
    meta = {
        "class": "TextQADataset",
        "corpus_id": "scifact_train",
        "query_instruction": "",
        "passage_instruction": "",
    }
    (out / "train_corpus" / "merlin_metadata.json").write_text(
        json.dumps(meta, indent=2) + "\n", encoding="utf-8"
    )
    write_jsonl(
        out / "train_corpus" / "docs.jsonl", [{"id": d, "text": doc_text(corpus[d])} for d in train_docs]
    )
    with open(out / "train.json", "w", encoding="utf-8", newline="\n") as f:
        # One record a line: compact, diff-friendly, and error messages name a distinct line per record.
        f.write('{"corpus": [{"path": "train_corpus"}],\n "data": [\n')
        f.write(",\n".join(json.dumps(r, ensure_ascii=False) for r in data))
        f.write("\n]}\n")

    stats = {
        "train_queries": len(kept),
        "train_queries_left_out": len(train_qrels) - len(kept),
        "train_corpus_docs": len(train_docs),
        "test_queries": len(test_qrels),
        "test_corpus_docs": len(test_docs),
        "test_relevant_docs": len(test_relevant),
    }
    sums = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != "SHA256SUMS":
            sums[str(p.relative_to(out))] = hashlib.sha256(p.read_bytes()).hexdigest()
    (out / "SHA256SUMS").write_text("".join(f"{h}  {n}\n" for n, h in sums.items()), encoding="utf-8")
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="BEIR SciFact folder (corpus.jsonl, queries.jsonl, qrels/)")
    parser.add_argument("out", type=Path, nargs="?", default=Path(__file__).parent / "scifact-mini")
    args = parser.parse_args(argv)
    stats = build(args.source, args.out)
    for k, v in stats.items():
        print(f"{k:>24}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
