"""Prefix tokens are attended to but, when asked, left out of pooling, for either padding side."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from embedtune.models import zoo
from embedtune.models.tokenization import ensure_pad_token, prefix_token_count, tokenize_texts


@pytest.fixture(scope="module")
def bert_tok():
    return AutoTokenizer.from_pretrained(zoo.minilm_path())


@pytest.fixture(scope="module")
def bpe_tok():
    # As every loader does: SmolLM2's GGUF tokenizer has no pad token at some transformers versions (5.4).
    tok = AutoTokenizer.from_pretrained(zoo.resolve("tiny-llama"))
    ensure_pad_token(tok)
    return tok


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("which", ["bert_tok", "bpe_tok"])
def test_prefix_excluded_from_pooling_mask(which: str, side: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(which)
    tok.padding_side = side
    texts = ["a short one", "a somewhat longer text with more words in it"]
    prefix = "Instruct: find the answer\nQuery: "
    out = tokenize_texts(tok, texts, prefixes=prefix, max_length=64, pool_prefix=False)
    full = tokenize_texts(tok, texts, prefixes=prefix, max_length=64, pool_prefix=True)
    prefix_ids = tok(prefix)["input_ids"]
    if prefix_ids[-1] in tok.all_special_ids:
        prefix_ids = prefix_ids[:-1]
    torch.testing.assert_close(full["pooling_mask"], full["attention_mask"])
    for row in range(2):
        real = out["attention_mask"][row].nonzero().flatten()
        pooled = out["pooling_mask"][row].nonzero().flatten()
        n = len(real) - len(pooled)
        # the dropped tokens are the first real ones, whatever the padding side ...
        assert pooled.tolist() == real[n:].tolist()
        # ... they are the prefix's own tokens, and at most one (a BPE merge across the boundary) is kept
        assert out["input_ids"][row, real[:n]].tolist() == prefix_ids[:n]
        assert len(prefix_ids) - 1 <= n <= len(prefix_ids) and n > 3


def test_per_text_prefixes(bert_tok) -> None:
    out = tokenize_texts(
        bert_tok,
        ["x y", "x y"],
        prefixes=["query: ", "a much longer instruction: "],
        max_length=32,
        pool_prefix=False,
    )
    # each row drops its own prefix: different lengths attended, the same text tokens pooled
    assert out["attention_mask"][0].sum() < out["attention_mask"][1].sum()
    pooled = [out["input_ids"][r][out["pooling_mask"][r].bool()].tolist() for r in range(2)]
    assert pooled[0] == pooled[1] == bert_tok("x y")["input_ids"][1:]  # "x y" [SEP], no [CLS]/prefix


def test_text_truncated_into_its_prefix_still_pools_something(bert_tok) -> None:
    out = tokenize_texts(
        bert_tok, ["text"], prefixes="a very long instruction " * 5, max_length=8, pool_prefix=False
    )
    assert int(out["pooling_mask"].sum()) > 0


def test_prefix_count_matches_sentence_transformers(bert_tok) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(zoo.minilm_path()), device="cpu")
    if not hasattr(st[0], "_get_prompt_length"):  # a private helper of sentence-transformers >= 6
        pytest.skip("sentence-transformers < 6 has no Transformer._get_prompt_length to compare with")
    for prefix in ["query: ", "Instruct: retrieve\nQuery: ", "passage: "]:
        assert prefix_token_count(bert_tok, prefix) == st[0]._get_prompt_length(prefix)


def test_ensure_pad_token_falls_back_to_eos_and_keeps_a_real_pad(bert_tok) -> None:
    tok = AutoTokenizer.from_pretrained(zoo.resolve("tiny-llama"))
    tok.pad_token = None
    ensure_pad_token(tok)
    assert tok.pad_token == tok.eos_token is not None
    before = bert_tok.pad_token
    ensure_pad_token(bert_tok)
    assert bert_tok.pad_token == before == "[PAD]"
