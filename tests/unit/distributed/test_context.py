"""Single-process behaviour of the distributed helpers: they reduce to the plain computation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from embedtune.errors import ConfigError
from embedtune.training import distributed as D
from embedtune.training.loss import InfoNCELoss, LossConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))


def test_without_torchrun_the_context_is_a_single_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = D.init_distributed(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.is_distributed) == (0, 1, True, False)
    assert not torch.distributed.is_initialized() and D.get_context() == ctx
    assert D.agree_on_signal(15, ctx) == 15 and D.agree_on_signal(None, ctx) is None


def test_config_and_strategy_errors_name_the_fix():
    with pytest.raises(ConfigError, match="timeout_minutes: must be > 0"):
        D.DistributedConfig(timeout_minutes=0)
    model = torch.nn.Linear(2, 2)
    assert D.wrap_model(model, "ddp", D.DistContext()) is model  # one process: nothing to wrap
    with pytest.raises(D.DistributedError, match="'zero3' is not one of: ddp, fsdp2"):
        D.wrap_model(model, "zero3", D.DistContext(world_size=2))  # type: ignore[arg-type]


def test_cross_rank_loss_in_one_process_is_the_plain_loss():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(9, 8, generator=g), dim=-1)
    ids = torch.tensor([0, 1, 2, 3, 0, 4, 5, 6, 7])
    loss_fn = InfoNCELoss(LossConfig(temperature=0.05))
    want = loss_fn(q, p, n_passages=3, doc_ids=ids)
    assert torch.equal(D.cross_rank_loss(loss_fn, q, p, n_passages=3, doc_keys=[ids]), want)
    assert D.gather_with_grad(p) is p and D.all_gather_sizes(4) == [4]
    with pytest.raises(ValueError, match="make_ids"):
        D.cross_rank_loss(loss_fn, q, p, n_passages=3, doc_keys=[ids, ids])
