"""Code that runs inside the spawned ranks of the distributed tests (module-level, so spawn can import it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from embedtune.training import distributed as D
from embedtune.training.gradcache import GradCache
from embedtune.training.loss import InfoNCELoss, LossConfig

N_PASSAGES = 3
VOCAB = 500  # token ids used by the synthetic batches (tiny-llama's vocabulary is larger)


def tiny_encoder(dropout: float = 0.0) -> nn.Module:
    """tiny-llama as a BiEncoder (seeded random weights, identical on every rank); optional dropout."""
    from embedtune.models import AutoBiEncoder

    enc = AutoBiEncoder.from_pretrained("tiny-llama", verify=False)
    for m in enc.modules():  # attention dropout makes RNG state matter (GradCache replay, resume)
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = dropout
    enc.train()
    return enc


class Float64Encoder(nn.Module):
    """A small transformer encoder in float64 (seeded): the BiEncoder call contract, no float32 anywhere.

    Used where a comparison must measure the method (gathers, offsets, averaging), not float32
    summation order: BiEncoder pools in float32 by design.
    """

    def __init__(self, vocab: int = VOCAB, dim: int = 32) -> None:
        super().__init__()
        torch.manual_seed(1234)
        self.emb = nn.Embedding(vocab, dim)
        self.layer = nn.TransformerEncoderLayer(dim, 2, 64, dropout=0.0, batch_first=True)
        self.out = nn.Linear(dim, dim)
        self.double()

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, pooling_mask: Tensor | None = None
    ) -> Tensor:
        h = self.layer(self.emb(input_ids), src_key_padding_mask=attention_mask == 0)  # (b, s, d)
        m = (attention_mask if pooling_mask is None else pooling_mask).unsqueeze(-1).double()
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)  # (b, d)
        return torch.nn.functional.normalize(self.out(pooled), dim=-1)


def build_model(kind: str) -> nn.Module:
    """``tiny-llama`` (a real BiEncoder, float32) or ``float64`` (:class:`Float64Encoder`)."""
    return Float64Encoder() if kind == "float64" else tiny_encoder()


def synthetic_batch(
    seed: int, b: int, n: int = N_PASSAGES, seq_q: int = 8, seq_p: int = 12
) -> dict[str, Any]:
    """A collated global batch (the collator's layout) from a seed: same on every rank."""
    g = torch.Generator().manual_seed(seed)

    def tokens(rows: int, seq: int) -> dict[str, Tensor]:
        ids = torch.randint(1, VOCAB, (rows, seq), generator=g)
        lengths = torch.randint(3, seq + 1, (rows,), generator=g)
        attn = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        pool = attn.clone()
        pool[:, :2] = 0  # an "instruction" left out of pooling: the GradCache trap stays covered
        return {"input_ids": ids * attn, "attention_mask": attn, "pooling_mask": pool}

    # Few distinct IDs: the same document shows up on both ranks, so cross-rank masking is exercised.
    doc_ids = torch.randint(0, b * n // 2, (b, n), generator=g)
    passages = tokens(b * n, seq_p)
    # The same document has the same text wherever it appears (as in real data): a duplicate of a
    # query's positive then scores like the positive, and masking it changes the loss a lot.
    flat = doc_ids.reshape(-1)
    for i in range(flat.shape[0]):
        first = int((flat == flat[i]).nonzero()[0])
        for k in passages:
            passages[k][i] = passages[k][first]
    return {"query": tokens(b, seq_q), "passages": passages, "doc_ids": doc_ids}


def _encode(model: nn.Module):
    return lambda x: model(x["input_ids"], x["attention_mask"], x["pooling_mask"])


def _grads(model: nn.Module) -> dict[str, Tensor]:
    inner = D.unwrap(model)
    return {n: p.grad.detach().clone() for n, p in inner.named_parameters() if p.grad is not None}


def _step_loss(
    model: nn.Module, mb: dict[str, Any], loss_fn: nn.Module, *, gradcache: int | None, gather: bool
) -> Tensor:
    """Forward + backward for one (local) micro-batch; returns the local loss."""
    ids = mb["doc_ids"].reshape(-1)

    def loss_of(q: Tensor, p: Tensor) -> Tensor:
        if gather:
            return D.cross_rank_loss(loss_fn, q, p, n_passages=N_PASSAGES, doc_keys=[ids])
        return loss_fn(q, p, n_passages=N_PASSAGES, doc_ids=ids, offset=0)

    if gradcache:
        if isinstance(model, D.ForwardingDDP):  # reduce once, in the last chunk's backward
            q_rows, p_rows = mb["query"]["input_ids"].shape[0], mb["passages"]["input_ids"].shape[0]
            model.sync_on_last_of(-(-q_rows // gradcache) - (-p_rows // gradcache))
        loss = GradCache(_encode(model), gradcache)(mb["query"], mb["passages"], loss_of)
        assert not getattr(model, "pending_sync_forwards", 0)
        return loss
    loss = loss_of(_encode(model)(mb["query"]), _encode(model)(mb["passages"]))
    loss.backward()
    return loss.detach()


def equivalence_worker(rank: int, world: int, out: str, cases: list[dict[str, Any]]) -> None:
    """For each case: 2-rank DDP loss/grads, and (rank 0) the single-process reference on the whole batch."""
    torch.manual_seed(0)
    loss_fn = InfoNCELoss(LossConfig(temperature=0.02, in_batch_negatives=True, mask_false_negatives=True))
    results: dict[str, Any] = {}
    for case in cases:
        name, b = case["name"], case["global_batch"]
        batch = synthetic_batch(case["seed"], b)
        plan = D.plan_batches(b, None, world, rank)
        # Distributed: DDP, this rank's contiguous share, cross-rank negatives (or not, for the control).
        model = D.wrap_model(build_model(case["model"]), "ddp")
        mb = D.slice_batch(batch, plan.positions(0))
        local = _step_loss(
            model, mb, loss_fn, gradcache=case.get("gradcache"), gather=case.get("gather", True)
        )
        mean_loss = local.clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world
        res = {"loss": mean_loss.item(), "grads": _grads(model)}
        if rank == 0:
            # Reference: one process, whole batch, no gather (the process group is not used by it).
            ref = build_model(case["model"])
            loss = loss_fn(
                _encode(ref)(batch["query"]),
                _encode(ref)(batch["passages"]),
                n_passages=N_PASSAGES,
                doc_ids=batch["doc_ids"].reshape(-1),
            )
            loss.backward()
            res["ref_loss"] = loss.item()
            res["ref_grads"] = _grads(ref)
            unmasked = loss_fn(
                _encode(ref)(batch["query"]).detach(),
                _encode(ref)(batch["passages"]).detach(),
                n_passages=N_PASSAGES,
                doc_ids=None,
            )
            res["ref_loss_unmasked"] = unmasked.item()
        results[name] = res
        dist.barrier()
    if rank == 0:
        torch.save(results, Path(out) / "equivalence.pt")


def sharded_encoding_worker(rank: int, world: int, out: str, texts: list[list[str]]) -> None:
    """Embed each text list through ``ShardedEncoder``; save the gathered arrays and this rank's work."""
    import numpy as np

    from embedtune.mining import ShardedEncoder

    enc = tiny_encoder()
    enc.eval()
    seen: list[int] = []
    forwards = [0]
    enc.backbone.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    real = enc.encode_documents

    def counting(batch: list[str], **kw: Any) -> Any:
        seen.append(len(batch))
        return real(batch, **kw)

    enc.encode_documents = counting  # type: ignore[method-assign]
    sharded = ShardedEncoder(enc, rank, world)
    arrays = {}
    for i, group in enumerate(texts):
        arrays[f"docs_{i}"] = sharded.encode_documents(group, batch_size=2)
        arrays[f"queries_{i}"] = sharded.encode_queries(group, batch_size=2)
    np.savez(
        Path(out) / f"rank{rank}.npz",
        seen=np.asarray(seen),
        forwards=np.asarray(forwards),
        fingerprint=np.asarray(str(sharded.fingerprint())),
        **arrays,
    )
