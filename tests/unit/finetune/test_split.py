"""The carved held-out split: no shared positive document, no near-identical query across the sides."""

from __future__ import annotations

import random

import pytest

from embedtune.finetune.split import carve_heldout, normalise_query


def _data(n: int = 200, seed: int = 0) -> tuple[list[str], list[list[int]]]:
    """Queries with deliberate near-duplicates and shared positive documents."""
    rng = random.Random(seed)
    queries, positives = [], []
    for i in range(n):
        if i % 7 == 3:  # a near-identical copy of an earlier query (case, punctuation, spacing)
            j = rng.randrange(i)
            queries.append("  " + queries[j].upper().replace(" ", "  ") + "?!")
            positives.append([10_000 + i])
        else:
            queries.append(f"what is item {i}")
            positives.append([i // 10 if i % 5 == 0 else 5_000 + i])  # pairs of queries share a document
    return queries, positives


def test_normalise_query_ignores_case_accents_punctuation_spacing() -> None:
    assert normalise_query("  Café,  au LAIT?! ") == normalise_query("cafe au lait") == "cafe au lait"
    assert normalise_query("what is x") != normalise_query("what is y")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_shared_document_and_no_near_identical_query(seed: int) -> None:
    queries, positives = _data(seed=seed)
    split = carve_heldout(queries, positives, fraction=0.2, seed=seed)
    assert split.heldout and split.train
    assert sorted(split.train + split.heldout) == list(range(len(queries)))
    train_docs = {d for i in split.train for d in positives[i]}
    held_docs = {d for i in split.heldout for d in positives[i]}
    assert not train_docs & held_docs
    train_q = {normalise_query(queries[i]) for i in split.train}
    assert not train_q & {normalise_query(queries[i]) for i in split.heldout}
    assert abs(len(split.heldout) - 0.2 * len(queries)) <= split.largest_group


def test_the_data_does_link_examples() -> None:
    """The fixture has links to respect: a split of examples one by one would break them."""
    queries, positives = _data()
    split = carve_heldout(queries, positives, fraction=0.2)
    assert split.groups < len(queries)
    naive = list(range(0, len(queries), 5))  # every fifth example, ignoring links
    naive_docs = {d for i in naive for d in positives[i]}
    rest_docs = {d for i in range(len(queries)) if i not in set(naive) for d in positives[i]}
    naive_q = {normalise_query(queries[i]) for i in naive}
    rest_q = {normalise_query(queries[i]) for i in range(len(queries)) if i not in set(naive)}
    assert naive_docs & rest_docs or naive_q & rest_q


def test_seeded_and_refuses_when_everything_is_linked() -> None:
    queries, positives = _data()
    assert carve_heldout(queries, positives, seed=4) == carve_heldout(queries, positives, seed=4)
    with pytest.raises(ValueError, match="--eval"):
        carve_heldout(["a", "b", "c"], [[1], [1], [1]])
    with pytest.raises(ValueError, match="at least 2"):
        carve_heldout(["a"], [[1]])
