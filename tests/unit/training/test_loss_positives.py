"""Masking by *all* positives of a query, against a naive per-query loop; the collator's positive keys."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from embedtune.data.collator import positive_id_rows
from embedtune.data.dataset import TrainItem
from embedtune.training.loss import PAD_KEY, InfoNCELoss, LossConfig, info_nce


def naive_components(keys: list[list[int]]) -> list[int]:
    """Same document = any key equal, transitively (plain union-find over pairs)."""
    n = len(keys)
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for i in range(n):
        for j in range(i):
            if any(a == b for a, b in zip(keys[i], keys[j])):
                parent[max(find(i), find(j))] = min(find(i), find(j))
    return [find(i) for i in range(n)]


def naive_loss(q, p, n_passages, temperature, in_batch, keys, positive_ids, offset):
    """One query at a time: drop every candidate that is the same document as one of its positives."""
    comp = naive_components(keys) if keys is not None else None
    losses = []
    for i in range(q.shape[0]):
        pos = (offset + i) * n_passages
        rows = range(p.shape[0]) if in_batch else range(pos, pos + n_passages)
        banned: set[int] = set()
        if comp is not None:
            banned.add(comp[pos])
            for key in positive_ids[i] if positive_ids is not None else []:
                banned |= {comp[j] for j in range(p.shape[0]) if key != PAD_KEY and keys[j][0] == key}
        logits = [
            float(q[i].double() @ p[j].double()) / temperature
            for j in rows
            if j == pos or comp is None or comp[j] not in banned
        ]
        m = max(logits)
        lse = m + math.log(sum(math.exp(x - m) for x in logits))
        losses.append(lse - float(q[i].double() @ p[pos].double()) / temperature)
    return sum(losses) / len(losses)


def _embeddings(seed: int, b_local: int, n: int, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b_local, d, generator=g), dim=-1), F.normalize(
        torch.randn(n, d, generator=g), dim=-1
    )


def test_a_second_positive_in_another_group_is_not_a_negative():
    # Query A (row 0) has positives {10, 11}; it samples 10. Query B (row 1) samples 11 as its positive,
    # so passage row 2 is A's other positive: scoring it as A's negative punishes a right answer.
    q, p = _embeddings(0, 2, 4)
    doc_ids = torch.tensor([[10, 20], [11, 21]])  # (B, n_passages): positive first, then a negative
    positive_ids = torch.tensor([[10, 11], [11, PAD_KEY]])  # (B, P_max)
    got = info_nce(q, p, n_passages=2, temperature=0.1, doc_ids=doc_ids, positive_ids=positive_ids)
    # By hand: A's candidates are rows 0, 1, 3 (row 2 removed); B's are all four rows.
    s = (q @ p.T).double() / 0.1
    loss_a = torch.logsumexp(s[0, [0, 1, 3]], 0) - s[0, 0]
    loss_b = torch.logsumexp(s[1], 0) - s[1, 2]
    assert got.item() == pytest.approx(((loss_a + loss_b) / 2).item(), rel=1e-6)
    one_positive = info_nce(q, p, n_passages=2, temperature=0.1, doc_ids=doc_ids)
    assert got.item() < one_positive.item()  # row 2 was a negative of A without positive_ids


def test_a_second_positive_as_a_hard_negative_is_masked_without_in_batch_negatives():
    q, p = _embeddings(1, 1, 3)
    doc_ids = torch.tensor([[10, 11, 12]])  # A's own hard negative 11 is in fact another positive of A
    got = info_nce(
        q,
        p,
        n_passages=3,
        temperature=0.1,
        in_batch_negatives=False,
        doc_ids=doc_ids,
        positive_ids=torch.tensor([[10, 11]]),
    )
    s = (q @ p.T).double() / 0.1
    assert got.item() == pytest.approx((torch.logsumexp(s[0, [0, 2]], 0) - s[0, 0]).item(), rel=1e-6)


@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("offset", [0, 3])
@pytest.mark.parametrize("two_keys", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_matches_naive_loop_with_many_collisions(in_batch, offset, two_keys, seed):
    g = torch.Generator().manual_seed(100 + seed)
    b_total, n_passages, b_local, p_max = 6, 3, 3, 4
    n = b_total * n_passages
    q, p = _embeddings(seed, b_local, n)
    ids = torch.randint(0, 8, (n,), generator=g)  # many documents repeat on purpose
    fps = torch.randint(0, 8, (n,), generator=g)
    keys = torch.stack([ids, fps], dim=1) if two_keys else ids
    positive_ids = torch.randint(0, 10, (b_local, p_max), generator=g)  # some keys are in no passage
    positive_ids[:, 0] = ids.view(b_total, n_passages)[offset : offset + b_local, 0]  # target first
    positive_ids[0, 2:] = PAD_KEY
    got = info_nce(
        q,
        p,
        n_passages=n_passages,
        temperature=0.05,
        in_batch_negatives=in_batch,
        doc_ids=keys,
        positive_ids=positive_ids,
        offset=offset,
    )
    key_rows = keys.view(n, -1).tolist()
    want = naive_loss(q, p, n_passages, 0.05, in_batch, key_rows, positive_ids.tolist(), offset)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_positive_ids_are_ignored_when_masking_is_off():
    q, p = _embeddings(2, 2, 4)
    loss = InfoNCELoss(LossConfig(temperature=0.1, mask_false_negatives=False))
    a = loss(
        q, p, n_passages=2, doc_ids=torch.tensor([1, 2, 3, 4]), positive_ids=torch.tensor([[1, 3], [3, 1]])
    )
    assert a.item() == pytest.approx(info_nce(q, p, n_passages=2, temperature=0.1).item())


def test_loss_module_passes_positive_ids_through_matryoshka():
    q, p = _embeddings(3, 2, 4, d=16)
    doc_ids, pos = torch.tensor([[10, 20], [11, 21]]), torch.tensor([[10, 11], [11, PAD_KEY]])
    cfg = LossConfig(temperature=0.1, matryoshka_dims=[16, 4])
    got = InfoNCELoss(cfg)(q, p, n_passages=2, doc_ids=doc_ids, positive_ids=pos)
    small = [F.normalize(x[:, :4], dim=-1) for x in (q, p)]
    want = [
        naive_loss(a, b, 2, 0.1, True, doc_ids.view(4, 1).tolist(), pos.tolist(), 0)
        for a, b in ((q, p), small)
    ]
    assert got.item() == pytest.approx(sum(want) / 2, rel=1e-5)


def test_bad_positive_ids_shape_is_a_clear_error():
    q, p = _embeddings(4, 2, 4)
    with pytest.raises(ValueError, match=r"positive_ids must be \(queries, P_max\)"):
        info_nce(q, p, n_passages=2, doc_ids=torch.arange(4), positive_ids=torch.tensor([1, 2]))


# ------------------------------------------------------------------------------------- collator rows
def _item(
    passages: tuple[str, ...], doc_ids: tuple[int, ...], positive_ids: tuple[int, ...] = ()
) -> TrainItem:
    return TrainItem("q", passages, doc_ids, None, None, 0, 0, positive_ids=positive_ids)


def test_positive_id_rows_put_the_sampled_positive_first_and_pad():
    rows = positive_id_rows(
        [
            _item(("b", "x"), (2, 9), positive_ids=(1, 2, 3)),  # sampled positive 2 of {1, 2, 3}
            _item(("c", "y"), (4, 8)),  # no positive_ids: falls back to its sampled positive's key
        ]
    )
    assert rows == [[2, 1, 3], [4, PAD_KEY, PAD_KEY]]


# ------------------------------------------------------------------------- through the shipped recipe
@pytest.mark.parametrize("gradcache", [False, True])
def test_the_recipe_hands_every_positive_to_the_loss(tmp_path, monkeypatch, gradcache):
    """One step of the real recipe: the loss receives each query's positive keys, sliced with its queries."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
    from _train_helpers import tiny_recipe

    from embedtune.config import load_config
    from embedtune.data.corpus import text_hash
    from embedtune.training import loss as loss_module
    from embedtune.training.config import TrainConfig
    from embedtune.training.recipe import train

    data = tmp_path / "multi.jsonl"
    rows = [
        {
            "query": f"query {i}",
            "pos_doc": [f"doc {i} first", f"doc {i} second", "shared doc"],
            "neg_doc": [f"neg {i}"],
        }
        for i in range(4)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recipe = tiny_recipe(tmp_path)
    recipe["data"] = {"datasets": [{"path": str(data)}], "n_passages": 2, "q_max_len": 8, "p_max_len": 8}
    recipe["step_scheduler"].update(global_batch_size=4, local_batch_size=2, max_steps=1)
    recipe["step_scheduler"].pop("ckpt_every_steps", None)
    recipe["validation"] = None
    if gradcache:
        recipe["gradcache"] = {"enabled": True, "chunk_size": 2}
        recipe["step_scheduler"].pop("local_batch_size")
    seen = []
    real = loss_module.info_nce

    def spy(*args, **kwargs):
        seen.append(kwargs.get("positive_ids"))
        return real(*args, **kwargs)

    monkeypatch.setattr(loss_module, "info_nce", spy)
    train(load_config(TrainConfig, recipe))
    assert seen and all(p is not None for p in seen)
    every = {text_hash(t) for i in range(4) for t in (f"doc {i} first", f"doc {i} second", "shared doc")}
    for pos in seen:
        assert pos.shape[1] == 3 and set(pos.reshape(-1).tolist()) <= every
        assert all(text_hash("shared doc") in row for row in pos.tolist())
    assert sum(p.shape[0] for p in seen) == 4  # each query once: sliced with its (micro-)batch


def test_rank_shares_with_gathered_keys_and_local_positive_ids_add_up_to_one_process():
    """Cross-rank negatives: each rank scores its own queries (offset, its rows of positive_ids) against
    the gathered passages and keys; the mean over ranks is the one-process loss on the whole batch."""
    g = torch.Generator().manual_seed(7)
    world, b_local, n_passages = 2, 3, 3
    b_total = world * b_local
    n = b_total * n_passages
    q, p = _embeddings(7, b_total, n)
    keys = torch.stack(
        [torch.randint(0, 14, (n,), generator=g), torch.randint(0, 60, (n,), generator=g)], dim=1
    )
    positive_ids = torch.randint(0, 14, (b_total, 3), generator=g)  # other queries' passages, often
    kw = dict(n_passages=n_passages, temperature=0.05, doc_ids=keys)
    whole = info_nce(q, p, positive_ids=positive_ids, **kw)
    shares = [
        info_nce(
            q[r * b_local : (r + 1) * b_local],
            p,
            positive_ids=positive_ids[r * b_local : (r + 1) * b_local],
            offset=r * b_local,
            **kw,
        )
        for r in range(world)
    ]
    assert (sum(shares) / world).item() == pytest.approx(whole.item(), rel=1e-6)
    unmasked = info_nce(q, p, **kw)
    assert abs(unmasked.item() - whole.item()) > 1e-4  # the extra positives do change the loss here
