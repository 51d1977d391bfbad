"""The per-rank split of a global batch reproduces the single-process order, without overlap."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embedtune.errors import EmbedtuneError
from embedtune.training.distributed import DistributedError, plan_batches, slice_batch


@settings(max_examples=200, deadline=None)
@given(world=st.integers(1, 8), micro=st.integers(1, 6), accum=st.integers(1, 5))
def test_ranks_cover_the_global_batch_once_in_single_process_order(world, micro, accum):
    g = micro * world * accum
    plans = [plan_batches(g, micro, world, r) for r in range(world)]
    assert {p.accumulation_steps for p in plans} == {accum}
    seen: list[int] = []
    for a in range(accum):
        # At each accumulation step the ranks, in rank order, hold one contiguous block of W·m
        # positions: the micro-batch of a single process with local_batch_size = W·m.
        block = [i for p in plans for i in p.positions(a)]
        assert block == list(range(a * world * micro, (a + 1) * world * micro))
        seen += block
    assert sorted(seen) == list(range(g)) and len(seen) == len(set(seen))


def _batch(b: int, n: int) -> dict:
    g = torch.Generator().manual_seed(b * 31 + n)
    tok = lambda rows: {  # noqa: E731
        "input_ids": torch.randint(0, 99, (rows, 5), generator=g),
        "attention_mask": torch.ones(rows, 5, dtype=torch.long),
        "pooling_mask": torch.ones(rows, 5, dtype=torch.long),
    }
    return {"query": tok(b), "passages": tok(b * n), "doc_ids": torch.randint(0, 9, (b, n), generator=g)}


@pytest.mark.parametrize(("world", "micro", "n"), [(2, 1, 1), (2, 3, 4), (4, 2, 2), (3, 2, 3)])
def test_rank_slices_concatenate_to_the_single_process_micro_batch(world, micro, n):
    g = world * micro * 2
    batch = _batch(g, n)
    for a in range(2):
        parts = [slice_batch(batch, plan_batches(g, micro, world, r).positions(a)) for r in range(world)]
        whole = slice_batch(batch, range(a * world * micro, (a + 1) * world * micro))
        for part in ("query", "passages"):
            for k in whole[part]:
                assert torch.equal(torch.cat([p[part][k] for p in parts]), whole[part][k])
        assert torch.equal(torch.cat([p["doc_ids"] for p in parts]), whole["doc_ids"])
        # Passages stay with their query: row i's group is rows [i·n, (i+1)·n).
        assert all(p["passages"]["input_ids"].shape[0] == micro * n for p in parts)


def test_gradcache_or_no_local_size_gives_one_micro_batch_per_rank():
    assert plan_batches(32, 4, 4, 0, gradcache=True).micro_batch_size == 8
    assert plan_batches(32, None, 4, 3).positions(0) == range(24, 32)
    assert plan_batches(32, None, 4, 3).accumulation_steps == 1


def test_inconsistent_sizes_are_explained():
    with pytest.raises(DistributedError, match=r"multiple of 4; use 28 or 32") as e:
        plan_batches(30, None, 4, 0)
    assert isinstance(e.value, EmbedtuneError)
    with pytest.raises(DistributedError, match=r"local_batch_size=3 does not divide .* 8 queries per rank"):
        plan_batches(16, 3, 2, 0)
    with pytest.raises(DistributedError, match=r"local × ranks × accumulation"):
        plan_batches(16, 16, 2, 0)
