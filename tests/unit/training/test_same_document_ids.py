"""same_document_ids (sort/unique, O(N log N)) == the O(N²) label propagation it replaced."""

from __future__ import annotations

import pytest
import torch

from embedtune.training.loss import same_document_ids

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def quadratic_same_document_ids(*keys: torch.Tensor) -> torch.Tensor:
    """The previous implementation (recipe.py before the sort/unique rewrite), kept as the reference."""
    n = keys[0].shape[0]
    same = torch.zeros(n, n, dtype=torch.bool)
    for k in keys:
        same |= k[:, None] == k[None, :]  # (N, N)
    labels = torch.arange(n)
    big = torch.full((n, n), n, dtype=torch.long)
    while True:
        new = torch.where(same, labels[None, :], big).min(dim=1).values
        if torch.equal(new, labels):
            return labels
        labels = new


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 80),
    n_keys=st.integers(1, 3),
    distinct=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
)
def test_equals_the_quadratic_version_on_random_keys_with_many_duplicates(n, n_keys, distinct, seed):
    g = torch.Generator().manual_seed(seed)
    # Few distinct values per key (and huge / negative ones, as 63-bit hashes and fingerprints are).
    values = torch.randint(-(2**62), 2**62, (distinct,), generator=g)
    keys = [values[torch.randint(0, distinct, (n,), generator=g)] for _ in range(n_keys)]
    assert torch.equal(same_document_ids(*keys), quadratic_same_document_ids(*keys))


def test_long_chains_across_two_keys():
    # 0~1 by key a, 1~2 by key b, 2~3 by key a, ...: one component of N, found from the far end.
    n = 101
    a = torch.arange(n) // 2
    b = (torch.arange(n) + 1) // 2 + 1000
    labels = same_document_ids(a.flip(0), b.flip(0))
    assert torch.equal(labels, torch.zeros(n, dtype=torch.long))
    assert torch.equal(labels, quadratic_same_document_ids(a.flip(0), b.flip(0)))


def test_distinct_keys_are_their_own_documents_and_bad_shapes_fail():
    assert torch.equal(same_document_ids(torch.tensor([5, 3, 9])), torch.arange(3))
    assert same_document_ids(torch.zeros(0, dtype=torch.long)).shape == (0,)
    with pytest.raises(ValueError, match="every key must have shape"):
        same_document_ids(torch.arange(3), torch.arange(4))
