"""The shared inference loop: length-sorted batches, input order kept, token-count sorting."""

from __future__ import annotations

import numpy as np
import pytest

from embedtune.errors import EmbedtuneError
from embedtune.models.encoding import encode_in_batches, token_lengths


def _recording_embedder(batches: list[list[str]]):
    def embed(texts: list[str], prefix: str | list[str] | None) -> np.ndarray:
        batches.append(list(texts))
        return np.array([[float(len(t)), float(t.count("x"))] for t in texts], dtype=np.float32)

    return embed


def test_rows_follow_the_input_order_whatever_the_sort_key():
    texts = ["x" * n for n in (3, 9, 1, 7, 5)]
    for lengths in (None, [9, 1, 7, 3, 5]):
        out = encode_in_batches(texts, _recording_embedder([]), batch_size=2, lengths=lengths)
        assert out[:, 0].tolist() == [3, 9, 1, 7, 5]


def test_batches_group_texts_by_the_given_token_counts_not_characters():
    # Characters and tokens disagree: "aaaaaaaa" is one long word (few tokens), "x y z w" many.
    texts = ["aaaaaaaaaaaa", "x y z w", "bbbbbbbbbbb", "x y z"]
    batches: list[list[str]] = []
    encode_in_batches(texts, _recording_embedder(batches), batch_size=2, lengths=[2, 7, 2, 5])
    assert batches == [["x y z w", "x y z"], ["aaaaaaaaaaaa", "bbbbbbbbbbb"]]
    batches.clear()
    encode_in_batches(texts, _recording_embedder(batches), batch_size=2)  # by characters
    assert batches[0] == ["aaaaaaaaaaaa", "bbbbbbbbbbb"]


def test_lengths_must_match_the_texts():
    with pytest.raises(EmbedtuneError, match="2 lengths for 3 texts"):
        encode_in_batches(["a", "b", "c"], _recording_embedder([]), batch_size=2, lengths=[1, 2])


def test_token_lengths_count_prefix_and_truncate():
    from transformers import AutoTokenizer

    from embedtune.models import zoo

    tok = AutoTokenizer.from_pretrained(str(zoo.resolve("minilm")))
    texts = ["hello world", "a much longer sentence " * 20]
    got = token_lengths(tok, texts, "query: ", max_length=16, block=1)
    want = [len(tok(["query: " + t], truncation=True, max_length=16)["input_ids"][0]) for t in texts]
    assert got == want and got[1] == 16
    per_text = token_lengths(tok, texts, ["", "query: "], max_length=512)
    assert per_text[0] == len(tok("hello world")["input_ids"])
