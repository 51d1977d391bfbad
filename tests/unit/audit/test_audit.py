"""The audit finds planted leaks and false negatives, and nothing on clean data."""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from embedtune.audit import AuditSettings, audit_training_data, format_summary, write_fixed, write_per_query
from embedtune.audit.text import jaccard, normalize, shingles, text_key
from embedtune.cli import main
from embedtune.data.formats import read_training_file
from embedtune.errors import ConfigError
from embedtune.eval.datasets import load_eval_set

pytest.importorskip("datasketch")

REPO = Path(__file__).resolve().parents[3]
MINI = REPO / "data" / "scifact-mini"

#: The false-positive rate we state for the text rules on clean data (the bundled set gives 0).
STATED_FALSE_POSITIVE_RATE = 0.005


def _find_shared_scifact() -> Path | None:
    for parent in Path(__file__).resolve().parents:
        p = parent / "shared" / "data" / "scifact"
        if (p / "corpus.jsonl").is_file():
            return p
    return None


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    # One corpus cache for the module: each test reads the same corpora.
    mp = pytest.MonkeyPatch()
    mp.setenv("EMBEDTUNE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def mini():
    if not (MINI / "train.json").is_file():
        pytest.skip("data/scifact-mini is not in this checkout")
    return read_training_file(MINI / "train.json")


@pytest.fixture(scope="module")
def mini_report(mini):
    return audit_training_data(mini, load_eval_set(MINI / "test"))


@pytest.fixture(scope="module")
def planted_set(mini, tmp_path_factory):
    """(path, planted texts per query, data, report) of the planted copy."""
    path = tmp_path_factory.mktemp("planted") / "planted.jsonl"
    planted = _planted_file(mini, path)
    data = read_training_file(path)
    return path, planted, data, audit_training_data(data)


def test_normalised_hash_and_shingles():
    assert text_key("Hello,  World!") == text_key("hello world") != text_key("hello worlds")
    assert normalize("Ａ–b") == "a b"
    ten = "one two three four five six seven eight nine ten"
    assert jaccard(shingles(ten), shingles(ten.replace("five", "FIVE!"))) == 1.0
    assert jaccard(shingles(ten), shingles(ten.replace("five", "zzz"))) == pytest.approx(9 / 11)


def test_bundled_scifact_mini_has_no_train_test_overlap(mini, mini_report):
    report = mini_report
    ov = report.summary["overlap"]
    d = ov["documents"]
    assert d["eval_corpus_in_training_exact"] == 0
    assert d["eval_relevant_in_training_exact"] == d["eval_relevant_in_training_near"] == 0
    assert d["eval_relevant_train_positive_exact"] == d["eval_relevant_train_positive_near"] == 0
    assert ov["queries"]["exact"] == 0
    # The one near-duplicate query is real: SciFact test claim 783 is train claim 782 with "highly
    # susceptible" replaced by "resistant" (a claim and its negation). The audit reports it.
    assert [(e["eval_query"], e["train_query"]) for e in ov["queries"]["near_examples"]] == [("783", "782")]
    # Clean BM25 negatives: nothing flagged (the stated false-positive rate is an upper bound).
    assert report.summary["negatives"]["flagged"] <= STATED_FALSE_POSITIVE_RATE * len(mini.neg_rows)
    assert report.summary["negatives"]["flagged"] == 0


def test_scifact_train_vs_test_shares_the_documents_an_independent_count_finds():
    root = _find_shared_scifact()
    if root is None:
        pytest.skip("shared/data/scifact is not available")

    def relevant(split: str) -> set[str]:
        out = set()
        for line in (root / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]:
            _q, d, r = line.split("\t")
            if int(r) >= 1:
                out.add(d)
        return out

    expected = len(relevant("test") & relevant("train"))  # by ID, straight from the qrels files
    assert expected == 181  # the number MEASURED.md gives
    train = read_training_file(root, split="train")
    report = audit_training_data(train, load_eval_set(root, "test"))
    d = report.summary["overlap"]["documents"]
    assert d["eval_relevant_train_positive_exact"] == expected
    assert d["eval_relevant_train_positive_share"] == pytest.approx(expected / len(relevant("test")))


def _change_one_word(text: str) -> str:
    words = text.split()
    k = min(4, len(words) - 1)
    words[k] = "zzplanted"
    return " ".join(words)


def _planted_file(mini, path: Path) -> dict[str, set[str]]:
    """Inline JSONL copy of scifact-mini with planted false negatives; returns query_id -> planted texts."""
    corpus = mini.corpus
    planted: dict[str, set[str]] = {}
    records = []
    for i in range(len(mini)):
        pos = corpus.texts(mini.positives(i))
        neg = corpus.texts(mini.negatives(i))
        qid = mini.query_ids[i]
        if i < 10:  # the example's own positive copied into its negatives (the reader refuses the
            # very same text, so it differs in case and punctuation only: the same normalised text)
            copy = pos[0].upper() + " ."
            neg = [*neg, copy]
            planted[qid] = {copy}
        elif i < 20:  # a near-duplicate of the positive: one word changed
            neg = [*neg, _change_one_word(pos[0])]
            planted[qid] = {_change_one_word(pos[0])}
        records.append({"question_id": qid, "query": mini.queries[i], "pos_doc": pos, "neg_doc": neg})
    for i in range(20, 30):
        # A second record for (nearly) the same query -- one word changed -- with another positive, and
        # example i's positive copied into its negatives: a positive of a near-identical query.
        other_pos = corpus.texts(mini.positives(i + 100))
        qid = f"dup-{mini.query_ids[i]}"
        query = _change_one_word(mini.queries[i]) if i % 2 else mini.queries[i]
        pos_i = corpus.texts(mini.positives(i))[0]
        records.append({"question_id": qid, "query": query, "pos_doc": other_pos, "neg_doc": [pos_i]})
        planted[qid] = {pos_i}
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return planted


def test_planted_false_negatives_are_all_found_and_clean_ones_are_not_flagged(planted_set):
    _, planted, data, report = planted_set
    found: dict[str, set[str]] = {}
    reasons: dict[str, set[str]] = {}
    for q in report.queries:
        for f in q.flags:
            found.setdefault(q.query_id, set()).add(data.corpus.text(f.row))
            reasons.setdefault(q.query_id, set()).update(f.reasons)
    missed = {q: t for q, t in planted.items() if not t <= found.get(q, set())}
    assert not missed
    extra = sum(len(t - planted.get(q, set())) for q, t in found.items())
    clean = len(data.neg_rows) - sum(len(t) for t in planted.values())
    assert extra <= STATED_FALSE_POSITIVE_RATE * clean, f"{extra} of {clean} clean negatives flagged"
    ids = data.query_ids
    # (A planted copy may have a second reason: SciFact's claim/negation pairs share their evidence.)
    assert all("same_as_positive" in reasons[ids[i]] for i in range(10))
    assert all("near_duplicate_of_positive" in reasons[ids[i]] for i in range(10, 20))
    assert all(reasons[f"dup-{ids[i]}"] == {"positive_of_similar_query"} for i in range(20, 30))

    # Without the near-duplicate checks the changed-word plants go unnoticed: the LSH path is what finds them.
    exact_only = audit_training_data(data, settings=AuditSettings(near_duplicates=False))
    assert exact_only.summary["negatives"]["by_reason"]["near_duplicate_of_positive"] == 0
    assert exact_only.summary["negatives"]["by_reason"]["same_as_positive"] == 10


def _bag_of_words(texts: list[str], dim: int = 512) -> np.ndarray:
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for i, t in enumerate(texts):
        for w in normalize(t).split():
            out[i, zlib.crc32(w.encode()) % dim] += 1
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_model_scores_flag_negatives_above_the_positive_share_and_give_the_gap(planted_set):
    _, _, data, _ = planted_set
    report = audit_training_data(data, score=lambda q, d: (_bag_of_words(q), _bag_of_words(d)))
    q10 = report.queries[10]  # its planted negative is its positive with one word changed
    assert any("scores_above_positive_share" in f.reasons for f in q10.flags)
    for f in q10.flags:
        assert f.score is not None and f.score > 0.95 * q10.positive_score
    sc = report.summary["scores"]
    assert sc["gap"]["count"] == len(data) and 0 <= sc["too_easy_share"] <= 1
    assert "too easy" in format_summary(report)


def test_fix_writes_a_clean_copy_and_never_touches_the_input(mini, mini_report, planted_set, tmp_path):
    src, planted, data, report = planted_set
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    out, counts = write_fixed(data, report, tmp_path / "fixed.jsonl", input_path=src)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    assert counts["negatives_removed"] == sum(len(t) for t in planted.values())
    again = audit_training_data(read_training_file(out), settings=AuditSettings(near_threshold=0.7))
    assert again.summary["negatives"]["flagged"] == 0 and len(again.queries) == len(data)
    with pytest.raises(ConfigError, match="must not be the input"):
        write_fixed(data, report, src, input_path=src)
    # Corpus-ID input -> corpus-ID output that reads back, against the same corpus folder.
    rep = mini_report
    fixed, counts = write_fixed(mini, rep, tmp_path / "mini_fixed.json", input_path=MINI / "train.json")
    back = read_training_file(fixed)
    assert len(back) == len(mini) - counts["examples_dropped_leaking"] == len(mini) - 1
    pq = write_per_query(rep, tmp_path / "pq.jsonl")
    lines = [json.loads(x) for x in pq.read_text().splitlines()]
    assert len(lines) == len(mini) and sum(1 for x in lines if x["eval_query_near"]) == 1


def test_cli_prints_the_table_and_writes_the_files(mini, tmp_path, capsys):
    _planted_file(mini, tmp_path / "planted.jsonl")  # a copy of its own: --fix must not touch it
    rc = main(
        [
            "audit",
            str(tmp_path / "planted.jsonl"),
            "--eval",
            str(MINI / "test"),
            "--output",
            str(tmp_path / "r.json"),
            "--per-query",
            str(tmp_path / "pq.jsonl"),
            "--fix",
            str(tmp_path / "fixed.jsonl"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "negatives flagged (any reason)" in out and "fixed copy:" in out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["negatives"]["flagged"] == 30 and rep["overlap"]["queries"]["exact"] == 0
    assert main(["audit", str(tmp_path / "planted.jsonl"), "--fix", str(tmp_path / "planted.jsonl")]) == 2
    assert "must not be the input" in capsys.readouterr().err
    assert main(["audit", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and "Traceback" not in err


def test_a_cross_encoders_pair_scores_give_what_the_same_scores_as_embeddings_give(planted_set):
    """pair_score (a reranker's view) == score (a bi-encoder's) when both compute the same numbers."""
    _, _, data, _ = planted_set
    by_embeddings = audit_training_data(data, score=lambda q, d: (_bag_of_words(q), _bag_of_words(d)))
    calls = []

    def pairs(queries, docs):
        calls.append(len(queries))
        return np.einsum("ij,ij->i", _bag_of_words(queries), _bag_of_words(docs))

    by_pairs = audit_training_data(data, pair_score=pairs)
    # one call over every (query, positive) and (query, negative) pair of the data
    assert calls == [len(data.pos_rows) + len(data.neg_rows)]
    assert by_pairs.summary["negatives"]["checked"]["scored_by"] == "cross-encoder"
    assert by_embeddings.summary["negatives"]["checked"]["scored_by"] == "bi-encoder"
    for a, b in zip(by_embeddings.queries, by_pairs.queries):
        assert a.positive_score == pytest.approx(b.positive_score, abs=1e-5)
        assert (a.hardest_negative_score is None) == (b.hardest_negative_score is None)
        if a.hardest_negative_score is not None:
            assert a.hardest_negative_score == pytest.approx(b.hardest_negative_score, abs=1e-5)
        assert sorted((f.row, f.reasons) for f in a.flags) == sorted((f.row, f.reasons) for f in b.flags)
    assert by_pairs.summary["scores"]["gap"] == pytest.approx(
        by_embeddings.summary["scores"]["gap"], abs=1e-6
    )
    with pytest.raises(ValueError, match="not both"):
        audit_training_data(data, score=lambda q, d: (q, d), pair_score=pairs)


def test_cli_audits_with_a_reranker(mini, tmp_path, capsys):
    import sys

    sys.path.insert(0, str(REPO / "tests" / "recipes"))
    from _train_helpers import teacher_reranker

    small = tmp_path / "small.jsonl"
    _planted_file(mini, small)
    reranker = teacher_reranker(tmp_path / "reranker")
    rc = main(["audit", str(small), "--reranker", str(reranker), "--output", str(tmp_path / "r.json")])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["negatives"]["checked"]["scored_by"] == "cross-encoder" and rep["scores"]["gap"]["count"] > 0
    assert main(["audit", str(small), "--reranker", str(reranker), "--model", "tiny-bert"]) == 2
    assert "give one" in capsys.readouterr().err
