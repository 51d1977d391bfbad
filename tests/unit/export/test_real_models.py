"""Export + verification of the real small models (slow: run with `make test-slow`)."""

from __future__ import annotations

import numpy as np
import pytest
from _export_helpers import TEXTS, needs_int8

from embedtune import AutoBiEncoder
from embedtune.export.onnx import export_onnx
from embedtune.export.runtime import OnnxBiEncoder
from embedtune.export.verify import retrieval_ndcg, small_beir_slice

pytestmark = pytest.mark.slow


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_minilm_fp32_export_reproduces_pytorch(tmp_path):
    model = AutoBiEncoder.from_pretrained("minilm")
    result = export_onnx(model, tmp_path / "minilm", log=print)
    assert result.parity is not None and result.parity.min_cosine >= 0.9999
    onnx_model = OnnxBiEncoder.from_pretrained(result.folder)
    assert (
        cosines(model.encode(TEXTS * 2, batch_size=3), onnx_model.encode(TEXTS * 2, batch_size=3)).min()
        >= 0.9999
    )


def test_smollm2_export_is_exact_bidirectional_and_ignores_padding(tmp_path):
    # pool_instruction=False gives the graph a pooling_mask input, which also lets the test pool one
    # chosen token: the first token's vector must move when only the last token changes.
    model = AutoBiEncoder.from_pretrained(
        "smollm2-135m", pooling="mean", query_prefix="query: ", pool_instruction=False, max_length=128
    )
    result = export_onnx(model, tmp_path / "smollm2", log=print)
    assert result.parity is not None and result.parity.min_cosine >= 0.9999
    assert result.parity.padding_sides == ("right", "left")
    onnx_model = OnnxBiEncoder.from_pretrained(result.folder)

    feats = {k: v.numpy() for k, v in onnx_model.tokenize(["the first token sees the last one"]).items()}
    first_only = np.zeros_like(feats["attention_mask"])
    first_only[:, 0] = 1
    bumped = feats["input_ids"].copy()
    bumped[0, -1] = (bumped[0, -1] + 101) % 40000 + 10
    a = onnx_model(feats["input_ids"], feats["attention_mask"], first_only)
    b = onnx_model(bumped, feats["attention_mask"], first_only)
    assert np.abs(a - b).max() > 1e-3  # bidirectional: a late token reaches the first position

    for side in ("right", "left"):
        onnx_model.tokenizer.padding_side = side
        batch = {k: v.numpy() for k, v in onnx_model.tokenize(TEXTS, "query").items()}
        pad = batch["attention_mask"] == 0
        changed = dict(batch, input_ids=np.where(pad, 1234, batch["input_ids"]))
        np.testing.assert_allclose(onnx_model(**changed), onnx_model(**batch), atol=1e-5)


@needs_int8
def test_int8_ndcg_on_a_scifact_slice_is_within_001_of_fp32(tmp_path, shared_scifact):
    eval_set = small_beir_slice(shared_scifact, max_queries=50, max_docs=500)
    result = export_onnx(
        "minilm", tmp_path / "int8", quantize="int8", eval_set=eval_set, eval_budget_s=None, log=print
    )
    print(f"NDCG@10 {eval_set.name}: {result.ndcg}")
    assert result.ndcg["fp32"] > 0.5  # a real retrieval score, not noise
    assert abs(result.ndcg["delta"]) <= 0.01
    # the figure is the written model's: re-measure it from the folder
    assert retrieval_ndcg(OnnxBiEncoder.from_pretrained(result.folder), eval_set) == pytest.approx(
        result.ndcg["int8"]
    )


@needs_int8
def test_smollm2_int8_passes_the_default_gate_and_its_ndcg_check_ends_within_the_budget(tmp_path):
    import time

    from embedtune.export.verify import MIN_COSINE, SmallEvalSet

    docs = [f"passage {i} about {w}" for i, w in enumerate(["cells", "ships", "rain", "jazz", "bread"] * 40)]
    eval_set = SmallEvalSet(
        name="toy",
        queries={"q0": "cells", "q1": "jazz music", "q2": "rain"},
        qrels={"q0": {"d0": 1}, "q1": {"d3": 1}, "q2": {"d2": 1}},
        doc_ids=[f"d{i}" for i in range(len(docs))],
        doc_texts=docs,
    )
    lines: list[str] = []
    started = time.perf_counter()
    result = export_onnx(
        "smollm2-135m",
        tmp_path / "int8",
        quantize="int8",
        eval_set=eval_set,
        eval_budget_s=20,
        log=lines.append,
    )
    print("\n".join(lines))
    assert result.parity is not None and result.parity.min_cosine >= MIN_COSINE["int8"]
    assert any("NDCG@10 check:" in line and "documents encoded twice" in line for line in lines)
    assert result.ndcg_slice["seconds"] < 20 + 60  # the budget, plus at most one chunk of two encoders
    print(f"whole int8 export {time.perf_counter() - started:.0f} s; {result.to_dict()}")
