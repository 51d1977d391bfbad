"""All positives of a query travel with the batch, so the loss never scores one of them as a negative."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _data_helpers import write_jsonl

from embedtune.data.collator import BiEncoderCollator
from embedtune.data.config import DataConfig
from embedtune.data.corpus import text_hash
from embedtune.data.dataset import TrainDataset
from embedtune.training.loss import PAD_KEY, info_nce, sequence_fingerprints


def _dataset(tmp_path: Path) -> TrainDataset:
    write_jsonl(
        tmp_path / "a.jsonl",
        [
            # Query A has two positives; query B's only positive is A's second one.
            {"query": "query a", "pos_doc": ["first of a", "second of a"], "neg_doc": ["negative one"]},
            {"query": "query b", "pos_doc": ["second of a"], "neg_doc": ["negative two"]},
        ],
    )
    config = DataConfig(datasets=[{"path": str(tmp_path / "a.jsonl")}], n_passages=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TrainDataset.from_config(config, batch_size=2)


def test_items_carry_every_positive(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    a, b = ds.item(0, 0, 0), ds.item(0, 1, 0)
    assert a.positive_ids == (text_hash("first of a"), text_hash("second of a"))
    assert b.positive_ids == (text_hash("second of a"),)
    assert a.doc_ids[0] in a.positive_ids  # the sampled positive is one of them (same hash space)


def test_a_second_positive_of_a_is_not_its_negative_through_the_collator(
    tmp_path: Path, minilm_tokenizer
) -> None:
    ds = _dataset(tmp_path)
    items = [ds.item(0, 0, 0), ds.item(0, 1, 0)]  # epoch 0: A samples "first of a"
    batch = BiEncoderCollator(minilm_tokenizer, q_max_len=16, p_max_len=16)(items)
    assert batch["positive_ids"].tolist() == [
        [text_hash("first of a"), text_hash("second of a")],
        [text_hash("second of a"), PAD_KEY],
    ]
    # The loss as the recipe calls it: keys [document ID, text fingerprint] per passage.
    fp = sequence_fingerprints(batch["passages"]["input_ids"], batch["passages"]["attention_mask"])
    keys = torch.stack([batch["doc_ids"].reshape(-1), fp], dim=1)
    g = torch.Generator().manual_seed(0)
    q, p = (
        F.normalize(torch.randn(2, 8, generator=g), dim=-1),
        F.normalize(torch.randn(4, 8, generator=g), dim=-1),
    )
    got = info_nce(q, p, n_passages=2, temperature=0.1, doc_ids=keys, positive_ids=batch["positive_ids"])
    s = (q @ p.T).double() / 0.1
    # A must not see row 2 ("second of a", B's positive) as a negative; B sees everything.
    want = (torch.logsumexp(s[0, [0, 1, 3]], 0) - s[0, 0] + torch.logsumexp(s[1], 0) - s[1, 2]) / 2
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
