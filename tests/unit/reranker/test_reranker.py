"""Cross-encoder reranker: sentence-transformers compatibility, training loop, rerank evaluation, ONNX."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from embedtune.errors import ConfigError

QUERIES = ["what is a cell", "why do stars shine", "q"]
PASSAGES = [
    "cells are the units of life",
    "stars fuse hydrogen into helium and the energy leaves as light for a very long time",
    "x",
]


@pytest.fixture(scope="module")
def tiny_reranker():
    from embedtune.reranker import CrossEncoderReranker

    torch.manual_seed(0)
    return CrossEncoderReranker.from_pretrained("tiny-bert", max_length=64)


def test_saved_reranker_scores_the_same_in_sentence_transformers(tmp_path: Path, tiny_reranker):
    from sentence_transformers import CrossEncoder

    from embedtune.reranker import CrossEncoderReranker

    folder = tiny_reranker.save_pretrained(tmp_path / "ce")
    ours = tiny_reranker.predict(QUERIES, PASSAGES, activation="sigmoid")
    st = CrossEncoder(str(folder), device="cpu", max_length=64)
    theirs = st.predict(list(zip(QUERIES, PASSAGES)))
    np.testing.assert_allclose(theirs, ours, atol=1e-6)
    reloaded = CrossEncoderReranker.from_pretrained(folder)
    np.testing.assert_allclose(
        reloaded.predict(QUERIES, PASSAGES), tiny_reranker.predict(QUERIES, PASSAGES), atol=1e-6
    )
    assert reloaded.settings.max_length == 64


def test_predict_keeps_input_order_across_batches(tiny_reranker):
    one_by_one = [tiny_reranker.predict([q], [p])[0] for q, p in zip(QUERIES, PASSAGES)]
    batched = tiny_reranker.predict(QUERIES, PASSAGES, batch_size=2)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    order = tiny_reranker.rerank(QUERIES[0], PASSAGES)
    assert [s for _, s in order] == sorted((s for _, s in order), reverse=True)


def test_decoder_backbone_is_converted_and_stays_bidirectional_after_saving(tmp_path: Path):
    from embedtune.models.bidirectional import attends_to_future
    from embedtune.reranker import NEMO_TEMPLATE, CrossEncoderReranker

    ce = CrossEncoderReranker.from_pretrained("tiny-llama", template=NEMO_TEMPLATE, max_length=64)
    assert ce.settings.bidirectional and attends_to_future(ce.backbone.base_model)
    folder = ce.save_pretrained(tmp_path / "llama-ce")
    assert json.loads((folder / "config.json").read_text())["is_causal"] is False
    again = CrossEncoderReranker.from_pretrained(folder)
    assert again.settings.template == NEMO_TEMPLATE and again.settings.bidirectional
    np.testing.assert_allclose(again.predict(QUERIES, PASSAGES), ce.predict(QUERIES, PASSAGES), atol=1e-5)


def test_template_must_name_query_and_passage():
    from embedtune.reranker import RerankerSettings

    with pytest.raises(ConfigError, match="passage"):
        RerankerSettings(template="question: {query}")


# ------------------------------------------------------------------------------------ training


def test_listwise_loss_is_log_group_size_for_ties_and_falls_as_the_positive_wins():
    from embedtune.reranker.train import listwise_loss

    ties = torch.zeros(4, 8)
    assert listwise_loss(ties).item() == pytest.approx(np.log(8), rel=1e-6)
    better = ties.clone()
    better[:, 0] = 2.0
    worse = ties.clone()
    worse[:, 3] = 2.0
    assert listwise_loss(better) < listwise_loss(ties) < listwise_loss(worse)


def _training_data(tmp_path: Path, n: int = 16):
    from embedtune.data.formats import read_training_file

    lines = [
        json.dumps(
            {
                "question_id": f"q{i}",
                "query": f"topic {i} question",
                "pos_doc": [f"all about topic {i}"],
                "neg_doc": [f"all about topic {(i + 1) % n}"],
            }
        )
        for i in range(n)
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, read_training_file(path, cache_dir=tmp_path / "c")


def test_groups_put_the_positive_first_and_never_fill_with_a_positive(tmp_path: Path):
    from embedtune.reranker.train import build_groups

    _, data = _training_data(tmp_path)
    groups = build_groups(data, list(range(len(data))), 6, random.Random(0))
    for i, g in enumerate(groups):
        pos = set(data.positives(i).tolist())
        assert len(g) == 6 and g[0] in pos
        assert not pos & set(g[1:]) and len(set(g)) == 6
        assert set(data.negatives(i).tolist()) <= set(g[1:])  # the file's negatives come first in line


def test_a_few_training_steps_run_and_save(tmp_path: Path):
    from embedtune.reranker import CrossEncoderReranker
    from embedtune.reranker.train import load_rerank_config, train_reranker

    path, data = _training_data(tmp_path, n=6)
    cfg = load_rerank_config(
        {
            "model": "tiny-bert",
            "data": str(path),
            "output_dir": str(tmp_path / "r"),
            "group_size": 2,
            "batch_size": 2,
            "max_length": 24,
            "max_steps": 3,
            "device": "cpu",
        }
    )
    result = train_reranker(cfg, data=data)
    assert result.steps == 3 and all(np.isfinite(result.losses))
    assert CrossEncoderReranker.from_pretrained(result.model_dir).predict(["a"], ["b"]).shape == (1,)


@pytest.mark.slow
def test_training_lowers_the_loss_resumes_and_saves_a_loadable_model(tmp_path: Path):
    from sentence_transformers import CrossEncoder

    from embedtune.reranker.train import load_rerank_config, train_reranker

    path, data = _training_data(tmp_path)
    base = {
        "model": "tiny-bert",
        "data": str(path),
        "output_dir": str(tmp_path / "run"),
        "group_size": 3,
        "batch_size": 4,
        "max_length": 32,
        "num_epochs": 8,
        "optimizer": {"lr": 3e-3},
        "lr_scheduler": {"warmup_ratio": 0.0},
        "log_every_steps": 100,
        "ckpt_every_steps": 4,
        "device": "cpu",
    }
    result = train_reranker(load_rerank_config({**base, "max_steps": 8}), data=data)
    assert result.steps == 8 and (tmp_path / "run" / "checkpoints" / "latest").is_file()
    resumed = train_reranker(load_rerank_config({**base, "max_steps": 24}), data=data)
    assert resumed.steps == 24 and len(resumed.losses) == 16  # continued from step 8
    assert np.mean(resumed.losses[-8:]) < np.mean(result.losses[:4])
    st = CrossEncoder(str(resumed.model_dir), device="cpu")
    assert st.predict([("topic 1 question", "all about topic 1")]).shape == (1,)


def test_recipe_is_validated():
    from embedtune.reranker.train import load_rerank_config

    with pytest.raises(ConfigError, match="group_size"):
        load_rerank_config({"data": "x.jsonl", "group_size": 1})
    with pytest.raises(ConfigError, match="recipe"):
        load_rerank_config({"data": "x.jsonl", "recipe": "train"})
    with pytest.raises(ConfigError):
        load_rerank_config({"data": "x.jsonl", "grup_size": 4})


# ------------------------------------------------------------------------------------ evaluation


class _OracleReranker:
    """Scores a pair 1 when the passage is relevant to the query, else 0 (or the reverse)."""

    def __init__(self, relevant: set[tuple[str, str]], reverse: bool = False) -> None:
        self.relevant, self.reverse = relevant, reverse

    def predict(self, queries, passages, **_):
        s = np.array([(q, p) in self.relevant for q, p in zip(queries, passages)], dtype=np.float32)
        return 1 - s if self.reverse else s


def test_reranking_gain_is_reranked_minus_retriever(tmp_path: Path):
    from embedtune.eval.datasets import eval_set_from_dicts
    from embedtune.reranker.evaluate import evaluate_reranking, fuse_runs

    corpus = {f"d{i}": f"doc {i}" for i in range(20)}
    queries = {f"q{i}": f"query {i}" for i in range(5)}
    qrels = {f"q{i}": {f"d{i}": 1} for i in range(5)}
    es = eval_set_from_dicts(corpus, queries, qrels, cache_dir=tmp_path)
    # A retriever run that ranks the relevant document 5th.
    run = {q: {f"d{j}": 1.0 - 0.01 * ((j - i) % 20) for j in range(20)} for i, q in enumerate(queries)}
    for q, i in zip(queries, range(5)):
        run[q][f"d{i}"] = 1.0 - 0.01 * 4.5
    relevant = {(queries[q], corpus[d]) for q, docs in qrels.items() for d in docs}
    good = evaluate_reranking(None, _OracleReranker(relevant), es, top_k=10, run=run, fusion_weight=0.5)
    bad = evaluate_reranking(None, _OracleReranker(relevant, reverse=True), es, top_k=10, run=run)
    assert good.reranked["ndcg@10"] == pytest.approx(1.0)
    assert bad.reranked["ndcg@10"] < good.retriever["ndcg@10"] < good.reranked["ndcg@10"]
    for m, g in good.gain.items():
        assert g == pytest.approx(good.reranked[m] - good.retriever[m])
    assert all(len(docs) == 10 for docs in good.run.values())  # only the top-k was rescored
    assert good.retriever["ndcg@10"] <= good.fused["ndcg@10"] <= good.reranked["ndcg@10"]
    same = fuse_runs(run, good.run, 1.0)
    assert all(sorted(same[q], key=same[q].get) == sorted(good.run[q], key=good.run[q].get) for q in same)


# ------------------------------------------------------------------------------------ ONNX, CLI


def test_onnx_export_matches_pytorch(tmp_path: Path, tiny_reranker):
    from embedtune.reranker.onnx import OnnxReranker, export_reranker_onnx

    report = export_reranker_onnx(tiny_reranker, tmp_path / "onnx")
    assert report["max_abs_diff"] <= 1e-4 and report["cases"] == 3
    onnx_scores = OnnxReranker(tmp_path / "onnx").predict(QUERIES, PASSAGES)
    np.testing.assert_allclose(onnx_scores, tiny_reranker.predict(QUERIES, PASSAGES), atol=1e-4)


def test_onnx_verification_refuses_a_graph_outside_the_tolerance(tmp_path: Path, tiny_reranker):
    from embedtune.export.errors import VerificationError
    from embedtune.reranker.onnx import export_reranker_onnx

    # Any real graph differs from PyTorch by >= 0, so a negative tolerance must be refused.
    with pytest.raises(VerificationError, match="differ from PyTorch"):
        export_reranker_onnx(tiny_reranker, tmp_path / "onnx", atol=-1.0)


def test_cli_score_orders_passages(tmp_path: Path, tiny_reranker, capsys):
    from embedtune.cli import main

    folder = tiny_reranker.save_pretrained(tmp_path / "ce")
    assert (
        main(
            [
                "rerank",
                "score",
                "--reranker",
                str(folder),
                "--query",
                QUERIES[0],
                "--passage",
                PASSAGES[0],
                "--passage",
                PASSAGES[1],
            ]
        )
        == 0
    )
    scores = [float(line.split("\t")[0]) for line in capsys.readouterr().out.strip().splitlines()]
    assert scores == sorted(scores, reverse=True) and len(scores) == 2


def test_cli_train_from_yaml_then_eval_reports_the_gain(tmp_path: Path, capsys):
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
    for split in ("train", "test"):
        (beir / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(8))
        )
    recipe = tmp_path / "rerank.yaml"
    recipe.write_text(
        f"recipe: rerank\nmodel: tiny-bert\ndata: {beir}\noutput_dir: {tmp_path / 'out'}\n"
        "group_size: 2\nbatch_size: 4\nmax_length: 24\nmax_steps: 2\ndevice: cpu\n"
    )
    assert main(["rerank", "train", str(recipe), "optimizer.lr=1e-4"]) == 0
    model_dir = tmp_path / "out" / "model"
    assert (model_dir / "embedtune_reranker.json").is_file()
    capsys.readouterr()
    out_json = tmp_path / "metrics.json"
    rc = main(
        [
            "rerank",
            "eval",
            "--reranker",
            str(model_dir),
            "--retriever",
            "tiny-bert",
            "--data",
            str(beir),
            "--top-k",
            "10",
            "--max-length",
            "24",
            "--cache-dir",
            str(tmp_path / "emb"),
            "--json",
            str(out_json),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| ndcg@10 |" in printed and "reranking the top 10" in printed
    m = json.loads(out_json.read_text())
    assert m["gain"]["ndcg@10"] == pytest.approx(m["reranked"]["ndcg@10"] - m["retriever"]["ndcg@10"])
    assert main(["rerank", "train", str(recipe), "group_size=1"]) == 2  # a recipe error is one line, exit 2
    capsys.readouterr()
    assert main(["train", str(recipe), "group_size=1"]) == 2  # `embedtune train` dispatches `recipe: rerank`
    err = capsys.readouterr().err
    assert (
        "group_size" in err and "unknown key" not in err
    )  # judged by the rerank config, not the bi-encoder one
