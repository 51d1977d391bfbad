"""Hard-negative mining: the margin filter, the rank window, positives, output files, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embedtune.errors import ConfigError, DataError
from embedtune.mining import (
    MiningSettings,
    margin_threshold,
    mine_from_embeddings,
    parse_range,
    select_negatives,
)

# ---------------------------------------------------------------------------- select_negatives


@st.composite
def _query_case(draw):
    n = draw(st.integers(1, 60))
    rows = draw(st.permutations(list(range(200))))[:n]
    scores = sorted(
        draw(st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=n, max_size=n)), reverse=True
    )
    pos = draw(st.lists(st.sampled_from(list(range(200))), min_size=1, max_size=4, unique=True))
    pos_scores = draw(
        st.lists(st.floats(-1, 1, allow_nan=False, width=32), min_size=len(pos), max_size=len(pos))
    )
    start = draw(st.integers(0, 20))
    end = draw(st.integers(start + 1, start + 60))
    num = draw(st.integers(1, end - start))
    margin_type = draw(st.sampled_from(["perc", "abs"]))
    margin = draw(st.floats(0.05, 1.0)) if margin_type == "perc" else draw(st.floats(0.0, 0.5))
    sampling = draw(st.sampled_from(["top", "random"]))
    cfg = MiningSettings(num, start, end, margin, margin_type, sampling, seed=draw(st.integers(0, 9)))
    return np.array(rows), np.array(scores), np.array(pos), np.array(pos_scores), cfg


@settings(max_examples=300, deadline=None)
@given(_query_case())
def test_margin_window_and_positives_hold_for_any_input(case):
    rows, scores, pos, pos_scores, cfg = case
    ex = select_negatives(rows, scores, pos, pos_scores, cfg)
    thr = margin_threshold(pos_scores, cfg.margin, cfg.margin_type)
    # Reference: positive-free ranking, the window, then the threshold.
    free = [(int(r), float(s)) for r, s in zip(rows, scores) if r not in set(pos.tolist())]
    window = free[cfg.range_start : cfg.range_end]
    eligible = [(r, s) for r, s in window if s <= thr]
    assert not set(ex.negatives) & set(pos.tolist()), "a positive was mined as a negative"
    assert all(s <= thr for s in ex.negative_scores), "a candidate above the threshold survived"
    assert set(ex.negatives) <= {r for r, _ in window}, "a negative came from outside the rank window"
    assert len(ex.negatives) == min(cfg.num_negatives, len(eligible))
    assert ex.dropped_margin == len(window) - len(eligible)
    if cfg.sampling == "top":
        assert ex.negatives == [r for r, _ in eligible[: cfg.num_negatives]]
    # Every dropped window candidate was above the threshold: nothing below it was thrown away.
    dropped = {r for r, _ in window} - {r for r, _ in eligible}
    assert all(s > thr for r, s in window if r in dropped)


def test_perc_margin_drops_exactly_the_candidates_above_margin_times_positive():
    pos_score = 0.8
    cfg = MiningSettings(num_negatives=10, range_start=0, range_end=10, margin=0.95, margin_type="perc")
    limit = 0.95 * pos_score
    scores = np.array([limit + 0.02, limit + 1e-6, limit, limit - 1e-6, limit - 0.3])
    ex = select_negatives(np.arange(5), scores, [99], [pos_score], cfg)
    assert ex.negatives == [2, 3, 4]  # the two candidates above 95% of the positive are gone
    assert ex.threshold == pytest.approx(limit)
    assert ex.dropped_margin == 2


def test_abs_margin_and_no_margin():
    scores = np.array([0.75, 0.65, 0.55])
    abs_cfg = MiningSettings(num_negatives=3, range_end=3, margin=0.1, margin_type="abs")
    assert select_negatives(np.arange(3), scores, [9], [0.8], abs_cfg).negatives == [1, 2]
    off = MiningSettings(num_negatives=3, range_end=3, margin=None)
    assert select_negatives(np.arange(3), scores, [9], [0.8], off).negatives == [0, 1, 2]


def test_threshold_follows_the_weakest_positive_and_stays_below_negative_positives():
    assert margin_threshold([0.9, 0.5], 0.9, "perc") == pytest.approx(0.45)
    # A negative positive score: the threshold must stay below it, not jump above it.
    assert margin_threshold([-0.2], 0.9, "perc") < -0.2


def test_positives_do_not_shift_the_rank_window():
    cfg = MiningSettings(num_negatives=2, range_start=1, range_end=3, margin=None)
    rows = np.array([7, 0, 1, 8, 2, 3])  # 7 and 8 are positives
    ex = select_negatives(rows, np.linspace(1, 0, 6), [7, 8], [1.0, 1.0], cfg)
    assert ex.negatives == [1, 2]  # ranks 1 and 2 of [0, 1, 2, 3]
    assert ex.dropped_positives == 2


def test_settings_and_range_are_validated():
    assert parse_range("10:100") == (10, 100)
    for bad in ("10", "a:b", "5:5", "-1:3"):
        with pytest.raises(ConfigError):
            parse_range(bad)
    with pytest.raises(ConfigError, match="fewer than num_negatives"):
        MiningSettings(num_negatives=5, range_start=0, range_end=3)
    with pytest.raises(ConfigError, match="fraction"):
        MiningSettings(margin=1.5, margin_type="perc")
    with pytest.raises(ConfigError):
        MiningSettings(margin_type="relative")


# ------------------------------------------------------------------------- mine_from_embeddings


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_mining_from_embeddings_never_returns_positives_and_matches_brute_force(tmp_path: Path):
    rng = np.random.default_rng(0)
    docs = _unit(rng.normal(size=(3000, 16)))
    # Queries close to their positives, so positives sit at the top of every candidate list.
    positives = [rng.choice(3000, size=rng.integers(1, 4), replace=False) for _ in range(40)]
    queries = _unit(np.stack([docs[p].mean(0) for p in positives]) + 0.05 * rng.normal(size=(40, 16)))
    mm = np.lib.format.open_memmap(tmp_path / "docs.npy", mode="w+", dtype=np.float32, shape=docs.shape)
    mm[:] = docs
    mm.flush()
    cfg = MiningSettings(num_negatives=5, range_start=3, range_end=30, margin=0.9, margin_type="perc")
    blocked = mine_from_embeddings(
        queries,
        np.load(tmp_path / "docs.npy", mmap_mode="r"),
        positives,
        cfg,
        query_block=7,
        corpus_block=500,
    )
    full = queries @ docs.T
    for i, ex in enumerate(blocked.examples):
        pos = set(positives[i].tolist())
        assert not set(ex.negatives) & pos
        assert len(ex.negatives) <= 5
        order = [int(r) for r in np.argsort(-full[i], kind="stable") if r not in pos]
        window = order[3:30]
        thr = margin_threshold(full[i, positives[i]], 0.9, "perc")
        expected = [r for r in window if full[i, r] <= thr + 1e-6][:5]
        assert ex.negatives == expected
        np.testing.assert_allclose(ex.negative_scores, full[i, expected], atol=1e-5)
        np.testing.assert_allclose(ex.positive_scores, full[i, positives[i]], atol=1e-5)
    assert blocked.stats["positives_retrieved_and_dropped"] >= 40  # they really were retrieved
    in_memory = mine_from_embeddings(queries, torch.from_numpy(docs), positives, cfg)
    assert [e.negatives for e in in_memory.examples] == [e.negatives for e in blocked.examples]


def test_faiss_backend_and_random_sampling_are_consistent():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    docs = _unit(rng.normal(size=(800, 12)))
    positives = [rng.choice(800, size=2, replace=False) for _ in range(15)]
    queries = _unit(np.stack([docs[p].mean(0) for p in positives]))
    cfg = MiningSettings(num_negatives=4, range_start=2, range_end=40, margin=0.95)
    exact = mine_from_embeddings(queries, docs, positives, cfg)
    faiss = mine_from_embeddings(queries, docs, positives, cfg, backend="faiss")
    assert [e.negatives for e in faiss.examples] == [e.negatives for e in exact.examples]
    sampled = [MiningSettings(4, 2, 40, 0.95, sampling="random", seed=s) for s in (0, 0, 1)]
    a, b, c = (mine_from_embeddings(queries, docs, positives, s).examples for s in sampled)
    assert [e.negatives for e in a] == [e.negatives for e in b]  # seeded: reproducible
    assert [e.negatives for e in a] != [e.negatives for e in c]  # another seed, another sample
    for i, (ea, ee) in enumerate(zip(a, exact.examples)):
        # A sample of the same window, after the same filter: below the threshold, never a positive.
        assert all(s <= ee.threshold for s in ea.negative_scores)
        assert not set(ea.negatives) & set(positives[i].tolist())


def test_a_query_without_positive_is_refused():
    with pytest.raises(DataError, match="no positive"):
        mine_from_embeddings(
            np.ones((1, 4), np.float32), np.ones((5, 4), np.float32), [[]], MiningSettings(1, 0, 3)
        )


def test_cross_encoder_rescoring_applies_the_margin_to_its_scores():
    rng = np.random.default_rng(1)
    docs = _unit(rng.normal(size=(50, 8)))
    q = docs[:1] + 0.01
    cfg = MiningSettings(num_negatives=3, range_start=0, range_end=10, margin=0.5, margin_type="abs")

    def rescore(i, rows):  # teacher: row 1 and 2 look as good as the positive; the rest are bad
        return np.where(np.isin(rows, [1, 2]), 5.0, -5.0 - rows / 100), np.array([5.0])

    res = mine_from_embeddings(q, docs, [[0]], cfg, rescore=rescore)
    ex = res.examples[0]
    assert not {0, 1, 2} & set(ex.negatives)
    assert len(ex.negatives) == 3
    assert ex.teacher_negative_scores == sorted(ex.teacher_negative_scores, reverse=True)
    assert all(s <= 5.0 - 0.5 for s in ex.teacher_negative_scores)
    np.testing.assert_allclose(ex.retriever_negative_scores, (q @ docs.T)[0, ex.negatives], atol=1e-5)


# ------------------------------------------------------------------------------- with a model


@pytest.fixture(scope="module")
def tiny_encoder():
    from embedtune.models import AutoBiEncoder

    return AutoBiEncoder.from_pretrained("tiny-bert", max_length=32)


def _inline_file(tmp_path: Path, n: int = 12) -> Path:
    topics = [
        "cells",
        "stars",
        "rivers",
        "proteins",
        "viruses",
        "metals",
        "forests",
        "oceans",
        "genes",
        "clouds",
        "bones",
        "engines",
    ]
    lines = []
    for i in range(n):
        t = topics[i % len(topics)]
        lines.append(
            json.dumps(
                {
                    "question_id": f"q{i}",
                    "query": f"what do {t} do {i}",
                    "pos_doc": [f"{t} are studied in text number {i}"],
                }
            )
        )
    extra = [
        json.dumps({"query": f"filler {j}", "pos_doc": f"a filler passage about item {j}"}) for j in range(20)
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines + extra) + "\n")
    return path


def test_mine_write_and_read_back_both_formats(tmp_path: Path, tiny_encoder):
    from embedtune.data.formats import read_training_file
    from embedtune.mining import mine_hard_negatives, write_mined

    src = _inline_file(tmp_path)
    data = read_training_file(src, cache_dir=tmp_path / "c")
    cfg = MiningSettings(num_negatives=3, range_start=0, range_end=20, margin=0.95)
    res = mine_hard_negatives(tiny_encoder, data, cfg, cache_dir=tmp_path / "emb")
    assert res.stats["corpus_from_cache"] is False
    again = mine_hard_negatives(tiny_encoder, data, cfg, cache_dir=tmp_path / "emb")
    assert again.stats["corpus_from_cache"] is True  # the evaluation's cache is reused
    assert again.info["fingerprint"] == res.info["fingerprint"]
    other = mine_hard_negatives(
        tiny_encoder, data, MiningSettings(3, 1, 20, 0.95), cache_dir=tmp_path / "emb"
    )
    assert other.info["fingerprint"] != res.info["fingerprint"]

    for name in ("mined.json", "mined.jsonl"):
        written = write_mined(data, res, tmp_path / "out" / name, input_path=src)
        back = read_training_file(written[0], cache_dir=tmp_path / "c2")
        assert len(back) == len(data)
        for i in range(len(back)):
            pos_texts = set(back.corpus.texts(back.positives(i)))
            neg_texts = back.corpus.texts(back.negatives(i))
            assert pos_texts == set(data.corpus.texts(data.positives(i)))
            assert not pos_texts & set(neg_texts)
            assert neg_texts == data.corpus.texts(res.examples[i].negatives)
        block_src = written[0] if name.endswith(".json") else written[1]
        doc = json.loads(block_src.read_text())
        block = doc.get("mining", doc)
        assert block["fingerprint"] == res.info["fingerprint"]
        assert block["settings"]["margin"] == 0.95 and block["settings"]["num_negatives"] == 3
        assert block["model"]["weights_fingerprint"]


def test_corpus_id_input_keeps_its_corpus_folder(tmp_path: Path, tiny_encoder):
    from embedtune.data.formats import read_training_file
    from embedtune.mining import mine_hard_negatives, write_mined

    folder = tmp_path / "in" / "docs"
    folder.mkdir(parents=True)
    (folder / "merlin_metadata.json").write_text(json.dumps({"class": "TextQADataset", "corpus_id": "docs"}))
    (folder / "docs.jsonl").write_text(
        "".join(
            json.dumps({"id": f"d{i}", "text": f"document {i} on topic {i % 5}"}) + "\n" for i in range(40)
        )
    )
    records = [
        {
            "question_id": f"q{i}",
            "question": f"topic {i % 5} question {i}",
            "corpus_id": "docs",
            "pos_doc": [{"id": f"d{i}"}],
        }
        for i in range(10)
    ]
    src = tmp_path / "in" / "train.json"
    src.write_text(json.dumps({"corpus": [{"path": "docs"}], "data": records}))
    data = read_training_file(src, cache_dir=tmp_path / "c")
    res = mine_hard_negatives(tiny_encoder, data, MiningSettings(4, 0, 30, None), cache_dir=None)
    out = tmp_path / "elsewhere" / "mined.json"
    write_mined(data, res, out, input_path=src)
    doc = json.loads(out.read_text())
    assert (out.parent / doc["corpus"][0]["path"]).resolve() == folder.resolve()
    assert not (tmp_path / "elsewhere" / "mined_corpus").exists()
    for rec in doc["data"]:
        pos = {d["id"] for d in rec["pos_doc"]}
        assert rec["neg_doc"] and not pos & {d["id"] for d in rec["neg_doc"]}
        assert [d["score"] for d in rec["neg_doc"]] == sorted(
            (d["score"] for d in rec["neg_doc"]), reverse=True
        )
    assert len(read_training_file(out, cache_dir=tmp_path / "c")) == 10


@pytest.mark.parametrize("single_object", [False, True])
def test_a_subset_of_a_corpus_id_file_reads_back_with_the_same_documents(
    tmp_path: Path, tiny_encoder, single_object: bool
):
    # A held-out split mines (or writes) a subset of the examples; with several corpora every record
    # must still name its corpus. NeMo writes a single corpus as one object instead of a list.
    from embedtune.data.formats import read_training_file
    from embedtune.mining import mine_hard_negatives, write_mined

    names = ["c0"] if single_object else ["c0", "c1"]
    for name in names:
        folder = tmp_path / "in" / f"folder_{name}"
        folder.mkdir(parents=True)
        (folder / "merlin_metadata.json").write_text(
            json.dumps({"class": "TextQADataset", "corpus_id": name})
        )
        (folder / "docs.jsonl").write_text(
            "".join(json.dumps({"id": f"d{i}", "text": f"{name} document {i}"}) + "\n" for i in range(12))
        )
    records = [
        {
            "question_id": f"q{i}",
            "question": f"question {i}",
            "corpus_id": names[i % len(names)],
            "pos_doc": [{"id": f"d{i}"}],
        }
        for i in range(10)
    ]
    corpus = {"path": "folder_c0"} if single_object else [{"path": f"folder_{n}"} for n in names]
    src = tmp_path / "in" / "train.json"
    src.write_text(json.dumps({"corpus": corpus, "data": records}))
    data = read_training_file(src, cache_dir=tmp_path / "c")
    subset = data.select([7, 2, 5, 0])
    res = mine_hard_negatives(tiny_encoder, subset, MiningSettings(2, 0, 8, None), cache_dir=None)
    out = tmp_path / "elsewhere" / "mined.json"
    write_mined(subset, res, out, input_path=src)
    back = read_training_file(out, cache_dir=tmp_path / "c")

    def docs(d, rows):
        return [d.corpus.text(int(r)) for r in rows]

    assert list(back.queries) == list(subset.queries)
    assert sum(len(ex.negatives) for ex in res.examples) > 0
    for i, ex in enumerate(res.examples):
        assert docs(back, back.positives(i)) == docs(subset, subset.positives(i))
        assert docs(back, back.negatives(i)) == docs(subset, ex.negatives)


def test_cli_mine_on_a_beir_folder(tmp_path: Path, tiny_encoder):
    from embedtune.cli import main

    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text(
        "".join(
            json.dumps({"_id": f"d{i}", "title": "", "text": f"text {i} about {i % 4}"}) + "\n"
            for i in range(30)
        )
    )
    (beir / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": f"about {i % 4} {i}"}) + "\n" for i in range(8))
    )
    (beir / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(8))
    )
    out = tmp_path / "mined.json"
    rc = main(
        [
            "mine",
            "--model",
            "tiny-bert",
            "--data",
            str(beir),
            "--output",
            str(out),
            "--num-negatives",
            "2",
            "--range",
            "1:10",
            "--no-cache",
            "--max-length",
            "32",
        ]
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["mining"]["settings"]["range_start"] == 1
    assert all(len(r["neg_doc"]) <= 2 for r in doc["data"])
    assert all(r["pos_doc"][0]["id"] not in {d["id"] for d in r["neg_doc"]} for r in doc["data"])
    assert (
        main(["mine", "--model", "tiny-bert", "--data", str(beir), "--output", str(out), "--range", "9:3"])
        == 2
    )


@pytest.mark.parametrize("name", ["mined.json", "mined.jsonl"])
def test_a_write_that_fails_half_way_keeps_the_previous_mined_file(
    tmp_path: Path, tiny_encoder, monkeypatch, name
):
    import embedtune.mining as mining
    from embedtune.data.formats import read_training_file

    src = _inline_file(tmp_path)
    data = read_training_file(src, cache_dir=tmp_path / "c")
    res = mining.mine_hard_negatives(
        tiny_encoder, data, MiningSettings(3, 0, 20, 0.95), cache_dir=tmp_path / "emb"
    )
    out = tmp_path / "out" / name
    written = mining.write_mined(data, res, out, input_path=src)
    before = {p: p.read_bytes() for p in written if p.is_file()}
    real, calls = mining._doc_entry, []

    def disk_fills(*args):
        calls.append(1)
        if len(calls) > 10:  # part of the file is already written when the disk fills
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(mining, "_doc_entry", disk_fills)
    with pytest.raises(OSError, match="No space"):
        mining.write_mined(data, res, out, input_path=src)
    assert {p: p.read_bytes() for p in written if p.is_file()} == before
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    assert len(read_training_file(out, cache_dir=tmp_path / "c2")) == len(data)
