"""Sampling: a pure function of (seed, epoch, index), random per epoch, covering every negative."""

from __future__ import annotations

import collections
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from _data_helpers import write_jsonl

from embedtune.data.config import DataConfig
from embedtune.data.dataset import TrainDataset
from embedtune.data.formats import read_training_file
from embedtune.data.problems import DataValidationError


def _file(tmp_path: Path, name: str, n: int, negs: int, pos: int = 1, tag: str = "") -> Path:
    rows = [
        {
            "question_id": f"{tag}{i}",
            "query": f"{tag} query {i}",
            "pos_doc": [f"{tag} positive {i}.{j}" for j in range(pos)],
            "neg_doc": [f"{tag} negative {i}.{j}" for j in range(negs)],
        }
        for i in range(n)
    ]
    return write_jsonl(tmp_path / name, rows)


def _ds(paths: list[Path], batch_size: int = 1, **kw) -> TrainDataset:
    config = DataConfig(datasets=[{"path": str(p)} for p in paths], **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TrainDataset.from_config(config, batch_size=batch_size)


def _epoch(ds: TrainDataset, epoch: int) -> list:
    ds.set_epoch(epoch)
    return [ds[i] for i in range(len(ds))]


def test_same_seed_and_epoch_give_the_same_items_in_a_fresh_dataset(tmp_path: Path) -> None:
    path = _file(tmp_path, "a.jsonl", 20, 9)
    a, b = _ds([path], n_passages=4, seed=3), _ds([path], n_passages=4, seed=3)
    for epoch in (0, 5, 2):  # out of order, as after a resume
        assert _epoch(a, epoch) == _epoch(b, epoch)
    # Random access does not depend on what was read before.
    b.set_epoch(5)
    assert b[7] == _epoch(a, 5)[7]


def test_epochs_and_seeds_differ(tmp_path: Path) -> None:
    path = _file(tmp_path, "a.jsonl", 20, 9)
    ds = _ds([path], n_passages=4, seed=3)
    e0, e1 = _epoch(ds, 0), _epoch(ds, 1)
    assert [it.example for it in e0] != [it.example for it in e1]  # order reshuffled
    by_ex0 = {it.example: it.passages[1:] for it in e0}
    by_ex1 = {it.example: it.passages[1:] for it in e1}
    assert sum(by_ex0[k] != by_ex1[k] for k in by_ex0) >= 15  # negatives re-drawn for most examples
    other = _ds([path], n_passages=4, seed=4)
    assert _epoch(other, 0) != e0


def test_each_epoch_visits_every_example_once(tmp_path: Path) -> None:
    ds = _ds([_file(tmp_path, "a.jsonl", 13, 3)], n_passages=2)
    for epoch in range(3):
        assert sorted(it.example for it in _epoch(ds, epoch)) == list(range(13))


def test_negatives_are_not_always_the_first_and_all_get_used(tmp_path: Path) -> None:
    n_neg, k = 10, 3
    ds = _ds([_file(tmp_path, "a.jsonl", 8, n_neg)], n_passages=k + 1, seed=11)
    enough = math.ceil(n_neg / k) + 1
    seen: dict[int, set[str]] = collections.defaultdict(set)
    first_epoch = {}
    for epoch in range(enough):
        for it in _epoch(ds, epoch):
            negs = it.passages[1:]
            assert len(set(negs)) == k  # no repeats within an item
            seen[it.example].update(negs)
            if epoch == 0:
                first_epoch[it.example] = negs
    data = ds.datasets[0]
    for ex, negs in seen.items():
        assert negs == set(data.corpus.texts(data.negatives(ex)))  # every negative used
    # File order is not what epoch 0 takes (NeMo's "first n" behaviour) for most examples.
    in_file_order = sum(
        list(first_epoch[ex]) == data.corpus.texts(data.negatives(ex)[:k]) for ex in first_epoch
    )
    assert in_file_order < len(first_epoch) / 2


def test_every_negative_is_used_once_per_cycle(tmp_path: Path) -> None:
    n_neg, k = 5, 2
    ds = _ds([_file(tmp_path, "a.jsonl", 3, n_neg)], n_passages=k + 1, seed=1)
    m = math.ceil(n_neg / k)
    data = ds.datasets[0]
    for ex in range(3):
        everything = set(data.corpus.texts(data.negatives(ex)))
        counts: collections.Counter[str] = collections.Counter()
        for cycle in range(10):
            used = [t for e in range(cycle * m, (cycle + 1) * m) for t in ds.item(0, ex, e).passages[1:]]
            assert set(used) == everything  # a full cycle covers the whole list
            counts.update(used)
        # Balanced: each negative once per cycle plus the short window's top-ups (1 per cycle here).
        assert all(10 <= c <= 20 for c in counts.values()), counts


def test_positives_cycle_across_epochs(tmp_path: Path) -> None:
    ds = _ds([_file(tmp_path, "a.jsonl", 4, 2, pos=3)], n_passages=2)
    data = ds.datasets[0]
    for ex in range(4):
        got = [ds.item(0, ex, epoch).passages[0] for epoch in range(6)]
        pos = data.corpus.texts(data.positives(ex))
        assert got == [pos[e % 3] for e in range(6)]


def test_doc_ids_are_text_hashes_and_match_for_equal_texts(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"query": "a", "pos_doc": "shared passage", "neg_doc": ["n1"]},
            {"query": "b", "pos_doc": "p2", "neg_doc": ["shared passage"]},
        ],
    )
    ds = _ds([tmp_path / "a.jsonl"], n_passages=2)
    a, b = ds.item(0, 0, 0), ds.item(0, 1, 0)
    assert a.doc_ids[0] == b.doc_ids[1]
    assert len({a.doc_ids[0], a.doc_ids[1], b.doc_ids[0]}) == 3
    assert all(0 <= x < 2**63 for x in a.doc_ids + b.doc_ids)


def test_fill_random_warns_once_with_the_count(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"query": f"q{i}", "pos_doc": f"p{i}", "neg_doc": [f"n{i}.{j}" for j in range(i)]}
            for i in range(6)
        ],
    )
    config = DataConfig(datasets=[{"path": str(tmp_path / "a.jsonl")}], n_passages=4, fill_negatives="random")
    with pytest.warns(UserWarning, match=r"3 of 6 examples have fewer than 3 negatives") as rec:
        ds = TrainDataset.from_config(config)
    assert len([w for w in rec if "fewer than" in str(w.message)]) == 1
    data = ds.datasets[0]
    for epoch in range(3):
        for ex in range(6):
            it = ds.item(0, ex, epoch)
            rows = [data.corpus.index_of(h) for h in (f"{t:016x}" for t in it.doc_ids)]
            assert len(set(rows)) == 4  # positive + 3 distinct negatives
            assert set(rows[1:]).isdisjoint(data.positives(ex).tolist())
            own = set(data.corpus.texts(data.negatives(ex)))
            if len(own) < 3:
                assert own <= set(it.passages[1:])  # a short list is used whole, then filled


def test_fill_repeat_and_error(tmp_path: Path) -> None:
    path = _file(tmp_path, "a.jsonl", 3, 1)
    ds = _ds([path], n_passages=4, fill_negatives="repeat")
    it = ds.item(0, 0, 0)
    assert len(it.passages) == 4 and len(set(it.passages[1:])) == 1
    with pytest.raises(DataValidationError, match=r"has 1 negative\(s\); n_passages needs 3") as info:
        _ds([path], n_passages=4, fill_negatives="error")
    assert info.value.total == 3
    assert str(info.value.problems[0]).startswith(f"{path}:1: neg_doc: ")
    none = _file(tmp_path, "b.jsonl", 2, 0)
    with pytest.raises(DataValidationError, match="fill_negatives: random"):
        _ds([none], n_passages=2, fill_negatives="repeat")


def test_mixing_weights_split_the_epoch(tmp_path: Path) -> None:
    a, b = _file(tmp_path, "a.jsonl", 30, 2, tag="a"), _file(tmp_path, "b.jsonl", 30, 2, tag="b")
    config = DataConfig(
        datasets=[{"path": str(a), "weight": 3.0}, {"path": str(b), "weight": 1.0}],
        n_passages=2,
        samples_per_epoch=40,
    )
    ds = TrainDataset.from_config(config)
    items = _epoch(ds, 0)
    assert len(items) == 40
    per = collections.Counter(it.dataset for it in items)
    assert per == {0: 30, 1: 10}
    # Mixed, not one data set after the other.
    assert {it.dataset for it in items[:10]} == {0, 1}


def test_same_dataset_per_batch(tmp_path: Path) -> None:
    a, b = _file(tmp_path, "a.jsonl", 10, 2, tag="a"), _file(tmp_path, "b.jsonl", 7, 2, tag="b")
    config = DataConfig(
        datasets=[{"path": str(a)}, {"path": str(b)}], n_passages=2, same_dataset_per_batch=True
    )
    ds = TrainDataset.from_config(config, batch_size=4)
    assert len(ds) % 4 == 0 and len(ds) >= 17  # shares rounded up to whole batches: nothing dropped
    for epoch in range(3):
        items = _epoch(ds, epoch)
        batches = [items[i : i + 4] for i in range(0, len(items), 4)]
        assert all(len({it.dataset for it in batch}) == 1 for batch in batches)
        assert {batch[0].dataset for batch in batches} == {0, 1}
        for d, n in ((0, 10), (1, 7)):
            assert {it.example for it in items if it.dataset == d} == set(range(n))


def test_instructions_per_dataset_override_the_corpus(tmp_path: Path) -> None:
    a, b = _file(tmp_path, "a.jsonl", 3, 1, tag="a"), _file(tmp_path, "b.jsonl", 3, 1, tag="b")
    config = DataConfig(
        datasets=[
            {"path": str(a), "query_instruction": "Find: ", "passage_instruction": "Doc: "},
            {"path": str(b)},
        ],
        n_passages=2,
    )
    ds = TrainDataset.from_config(config)
    for it in _epoch(ds, 0):
        if it.dataset == 0:
            assert (it.query_instruction, it.passage_instruction) == ("Find: ", "Doc: ")
        else:
            assert (it.query_instruction, it.passage_instruction) == (None, None)


def test_recipe_seed_is_used_when_data_seed_is_null(tmp_path: Path) -> None:
    path = _file(tmp_path, "a.jsonl", 12, 4)
    config = DataConfig(datasets=[{"path": str(path)}], n_passages=3)
    one, two = TrainDataset.from_config(config, seed=1), TrainDataset.from_config(config, seed=2)
    assert _epoch(one, 0) != _epoch(two, 0)
    assert _epoch(one, 0) == _epoch(TrainDataset.from_config(config, seed=1), 0)


def test_works_as_a_torch_dataset(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    ds = _ds([_file(tmp_path, "a.jsonl", 6, 2)], n_passages=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=False, collate_fn=list)
    batches = list(loader)
    assert [len(b) for b in batches] == [3, 3]
    assert [it.example for b in batches for it in b] == [it.example for it in _epoch(ds, 0)]


def test_large_example_counts_stay_in_arrays(tmp_path: Path) -> None:
    path = _file(tmp_path, "a.jsonl", 2000, 3)
    data = read_training_file(path)
    assert isinstance(data.neg_rows, np.ndarray) and len(data.neg_rows) == 6000
