"""Every tensor handed to a collective is on the process group's device (NCCL takes CUDA tensors only).

gloo accepts CPU tensors, so a CPU test of cross-rank negatives passes whether or not the collator's
CPU tensors (document IDs, fingerprints) reach the collective unmoved — while NCCL fails at step 1.
Here the group's device is simulated: the rank "trains on" the ``meta`` device (shapes, no data), the
collectives of ``torch.distributed`` are replaced by recorders that note every input's device (and do
nothing else), and the test asserts that all of them were on ``meta``. The collator's tensors stay on
the CPU, as they really are.

Shown failing on the code before the fix: ``test_gathers_move_collator_tensors_to_the_group_device``
fails on main at 4691aa0 (``gather_tensor`` handed the CPU key tensor straight to ``all_gather``), and
the task test fails when the keys are built on the CPU and gathered unmoved (the old recipe's path).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from embedtune.training import process_group
from embedtune.training.process_group import DistContext

GROUP_DEVICE = torch.device("meta")
COLLECTIVES = ("all_gather", "all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast")


@pytest.fixture
def fake_group(monkeypatch, tmp_path) -> list[tuple[str, torch.device]]:
    """A 2-rank job on the ``meta`` device, as seen by rank 0; returns the recorded (collective, device)s."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    monkeypatch.setattr(
        process_group, "_CONTEXT", DistContext(rank=0, world_size=2, device=GROUP_DEVICE, backend="nccl")
    )
    seen: list[tuple[str, torch.device]] = []

    def recorder(name: str) -> Any:
        def collective(*args: Any, **kwargs: Any) -> None:
            for a in [*args, *kwargs.values()]:
                for t in a if isinstance(a, (list, tuple)) else [a]:
                    if isinstance(t, torch.Tensor):
                        seen.append((name, t.device))

        return collective

    for name in COLLECTIVES:
        monkeypatch.setattr(dist, name, recorder(name))
    yield seen
    dist.destroy_process_group()


def _off_device(seen: list[tuple[str, torch.device]]) -> list[tuple[str, torch.device]]:
    return [(n, d) for n, d in seen if d != GROUP_DEVICE]


def test_gathers_move_collator_tensors_to_the_group_device(fake_group):
    from embedtune.training import collectives as C

    keys = torch.arange(12)  # (N,) document keys as the collator builds them: on the CPU
    passages = torch.randn(12, 8, device=GROUP_DEVICE, requires_grad=True)  # embeddings: on the device
    gathered_keys = C.gather_tensor(keys, sizes=[12, 12])
    gathered = C.gather_with_grad(passages, sizes=[12, 12])
    gathered.sum().backward()  # the backward all-reduces the gradient
    assert gathered_keys.shape == (24,) and gathered.shape == (24, 8)
    assert {n for n, _ in fake_group} == {"all_gather", "all_reduce"}
    assert not _off_device(fake_group), _off_device(fake_group)


class _MetaEncoder(nn.Module):
    """Embedding → linear → masked mean → L2, following the BiEncoder call contract."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask, pooling_mask=None):
        m = (attention_mask if pooling_mask is None else pooling_mask).unsqueeze(-1).float()
        pooled = (self.proj(self.emb(input_ids)) * m).sum(1) / m.sum(1).clamp(min=1)
        return F.normalize(pooled, dim=-1)


def _collated_batch(b: int = 2, n: int = 3, seq: int = 5) -> dict[str, Any]:
    """The collator's layout, every tensor on the CPU (as the real collator returns it)."""

    def tokens(rows: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1, 50, (rows, seq))
        mask = torch.ones(rows, seq, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "pooling_mask": mask.clone()}

    return {
        "query": tokens(b),
        "passages": tokens(b * n),
        "doc_ids": torch.randint(0, 2**62, (b, n)),
        "positive_ids": torch.randint(0, 2**62, (b, 2)),  # (B, P_max) keys of every positive
    }


@pytest.mark.parametrize("gradcache", [False, True])
def test_the_bi_encoder_loss_hands_only_group_device_tensors_to_collectives(
    fake_group, monkeypatch, gradcache
):
    """The task's distributed loss (cross-rank negatives + false-negative masking), forward and backward."""
    import embedtune.training.tasks as tasks
    from embedtune.config import load_config
    from embedtune.training.config import TrainConfig
    from embedtune.training.parallel import Parallel

    cfg = load_config(
        TrainConfig,
        {
            "model": {"name_or_path": "tiny-llama"},
            "data": {"datasets": [{"path": "unused.jsonl"}], "n_passages": 3},
            "loss": {"in_batch_negatives": True, "mask_false_negatives": True},
            "gradcache": {"enabled": gradcache, "chunk_size": 2},
        },
    )
    parallel = Parallel(process_group.get_context(), cfg.distributed)
    assert parallel.gathers_negatives and parallel.device == GROUP_DEVICE
    task = tasks.BiEncoderTask(cfg)
    # The loss itself runs no collective, and labelling documents needs values (meta tensors have none):
    # a stand-in that records what the loss is handed and keeps the embeddings' gradient path.
    handed: dict[str, Any] = {}

    def loss_fn(q, p, **kwargs):
        handed.update(kwargs, passages=p)
        return (q @ p.T).mean()

    task.loss_fn = loss_fn
    model = _MetaEncoder().to(GROUP_DEVICE)
    if gradcache:
        # GradCache checks the loss is finite (a value): on meta that has no answer, so say "finite".
        monkeypatch.setattr(torch, "isfinite", lambda t: torch.tensor(True))
    task.forward_backward(model, _collated_batch(), parallel, scale=1.0)
    b, n = 2, 3
    assert handed["passages"].shape == (2 * b * n, 16)  # both ranks' passages
    assert handed["doc_ids"].shape == (2 * b * n, 2) and handed["doc_ids"].device == GROUP_DEVICE
    assert handed["positive_ids"].shape == (b, 2) and handed["positive_ids"].device == GROUP_DEVICE
    assert handed["offset"] == 0
    names = [n for n, _ in fake_group]
    assert names.count("all_gather") >= 2  # passages and their keys
    assert "all_reduce" in names  # the gather's backward
    assert not _off_device(fake_group), _off_device(fake_group)
