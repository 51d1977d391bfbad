"""The collator: lengths, padding, instructions, pooling mask and document IDs."""

from __future__ import annotations

import pytest

from embedtune.data.collator import BiEncoderCollator
from embedtune.data.corpus import text_hash
from embedtune.data.dataset import TrainItem


def _item(q: str, passages: list[str], qi: str | None = None, pi: str | None = None) -> TrainItem:
    return TrainItem(q, tuple(passages), tuple(text_hash(p) for p in passages), qi, pi, 0, 0)


LONG = " ".join(["word"] * 200)


def test_shapes_lengths_and_padding(minilm_tokenizer) -> None:
    col = BiEncoderCollator(minilm_tokenizer, q_max_len=16, p_max_len=40, pad_to_multiple_of=8)
    items = [_item("short query", ["a passage", LONG, "x"]), _item(LONG, ["b", "c", "d"])]
    b = col(items)
    q, p = b["query"], b["passages"]
    assert q["input_ids"].shape == (2, 16)
    assert p["input_ids"].shape == (6, 40)
    assert int(q["attention_mask"].sum(1).max()) == 16 and int(p["attention_mask"].sum(1).max()) == 40
    assert b["doc_ids"].shape == (2, 3) and b["doc_ids"].dtype.is_floating_point is False
    # Passages are item-major with the positive first: row 3 is item 1's positive.
    assert minilm_tokenizer.decode(p["input_ids"][3], skip_special_tokens=True) == "b"
    assert b["doc_ids"][1, 0].item() == text_hash("b")


def test_pad_to_multiple_rounds_up_short_batches(minilm_tokenizer) -> None:
    b = BiEncoderCollator(minilm_tokenizer, q_max_len=64, p_max_len=64, pad_to_multiple_of=8)(
        [_item("hi", ["a b c"])]
    )
    assert b["query"]["input_ids"].shape[1] == 8 and int(b["query"]["attention_mask"].sum()) < 8
    unpadded = BiEncoderCollator(minilm_tokenizer, q_max_len=64, p_max_len=64)([_item("hi", ["a b c"])])
    assert unpadded["query"]["input_ids"].shape[1] == int(unpadded["query"]["attention_mask"].sum())


def test_lengths_must_fit_the_padding_multiple(minilm_tokenizer) -> None:
    from embedtune.errors import ConfigError

    with pytest.raises(ConfigError, match="q_max_len: 12 is not a multiple"):
        BiEncoderCollator(minilm_tokenizer, q_max_len=12, pad_to_multiple_of=8)


def test_instructions_and_default_prefixes(minilm_tokenizer) -> None:
    col = BiEncoderCollator(
        minilm_tokenizer, q_max_len=32, p_max_len=32, query_prefix="query: ", passage_prefix="passage: "
    )
    b = col([_item("what", ["doc"], qi="find this:", pi=None), _item("who", ["doc2"])])
    dec = [minilm_tokenizer.decode(ids, skip_special_tokens=True) for ids in b["query"]["input_ids"]]
    assert dec == ["find this : what", "query : who"]
    dec_p = [minilm_tokenizer.decode(ids, skip_special_tokens=True) for ids in b["passages"]["input_ids"]]
    assert dec_p == ["passage : doc", "passage : doc2"]


def test_pooling_mask_excludes_instructions_when_asked(minilm_tokenizer) -> None:
    items = [_item("what is it", ["some document"], qi="Instruct: retrieve. Query:")]
    kept = BiEncoderCollator(minilm_tokenizer, pool_instruction=True)(items)
    dropped = BiEncoderCollator(minilm_tokenizer, pool_instruction=False)(items)
    qk, qd = kept["query"], dropped["query"]
    assert (qk["pooling_mask"] == qk["attention_mask"]).all()
    n_instr = int((qk["pooling_mask"] - qd["pooling_mask"]).sum())
    assert n_instr >= len(minilm_tokenizer.tokenize("Instruct: retrieve. Query:"))
    assert (qd["pooling_mask"] <= qd["attention_mask"]).all() and int(qd["pooling_mask"].sum()) > 0
    # Passages had no prefix: nothing to exclude.
    assert (dropped["passages"]["pooling_mask"] == dropped["passages"]["attention_mask"]).all()


def test_from_encoder_takes_prefixes_and_pooling_setting(minilm_tokenizer) -> None:
    from types import SimpleNamespace

    from embedtune.data.config import DataConfig

    enc = SimpleNamespace(
        tokenizer=minilm_tokenizer,
        settings=SimpleNamespace(query_prefix="query: ", passage_prefix="passage: ", pool_instruction=False),
    )
    col = BiEncoderCollator.from_encoder(enc, DataConfig(datasets=["x.jsonl"], q_max_len=24, p_max_len=32))
    assert (col.query_prefix, col.passage_prefix, col.pool_instruction) == ("query: ", "passage: ", False)
    assert (col.q_max_len, col.p_max_len, col.pad_to_multiple_of) == (24, 32, 8)
    col2 = BiEncoderCollator.from_encoder(enc, DataConfig(datasets=["x.jsonl"], pool_instruction=True))
    assert col2.pool_instruction is True  # the data config wins when set


def test_rejects_ragged_batches(minilm_tokenizer) -> None:
    col = BiEncoderCollator(minilm_tokenizer)
    with pytest.raises(ValueError, match="same number of passages"):
        col([_item("a", ["p", "n"]), _item("b", ["p"])])
