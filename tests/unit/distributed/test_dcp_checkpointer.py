"""DistributedCheckpointer in one process: exact round trip, DCP .metadata as the commit marker, rank checks.

(The same code under 2 ranks, with SIGTERM and resume, is in test_ddp_fsdp2_training.py.)
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from embedtune.errors import EmbedtuneError
from embedtune.training.checkpoint import TrainState
from embedtune.training.distributed import DistContext, DistributedCheckpointer


def _model_and_opt(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    model[0].weight.requires_grad_(False)  # frozen (as LoRA's base): not stored, not restored
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return model, opt


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 6)).pow(2).sum().backward()
        opt.step()


def test_round_trip_is_exact_and_the_metadata_file_commits(tmp_path):
    model, opt = _model_and_opt(0)
    ck = DistributedCheckpointer(tmp_path, DistContext(), keep_last=2)
    _train(model, opt, 2)
    ck.save(model, opt, state=TrainState(step=2, epoch=0, step_in_epoch=2), scheduler={"last_epoch": 2})
    _train(model, opt, 1)
    third = ck.save(model, opt, state=TrainState(step=3, step_in_epoch=3), scheduler={"last_epoch": 3})
    assert ck.latest() == third and [p.name for p in ck.list()] == ["step_00000002", "step_00000003"]
    torch.manual_seed(99)
    _train(model, opt, 2)  # what a continued run does next, from the same RNG state
    want = {k: v.clone() for k, v in model.state_dict().items()}

    # A fresh process: different weights; load, then the same two steps reproduce the weights exactly.
    model2, opt2 = _model_and_opt(1)
    state, sched = ck.load(ck.resolve("latest"), model2, opt2)
    assert (state.step, state.step_in_epoch, sched) == (3, 3, {"last_epoch": 3})
    assert not torch.equal(model2[0].weight, want["0.weight"])  # frozen weights are not in checkpoints
    model2[0].weight.data.copy_(want["0.weight"])
    torch.manual_seed(99)
    _train(model2, opt2, 2)
    assert all(torch.equal(model2.state_dict()[k], want[k]) for k in want if k != "0.weight")

    # Without DCP's .metadata the newest folder is an interrupted save: never resumed from.
    (third / "dcp" / ".metadata").unlink()
    assert ck.latest().name == "step_00000002"
    with pytest.raises(EmbedtuneError, match=r"interrupted"):
        ck.resolve(str(third))


def test_rng_is_restored_per_rank_and_rank_count_must_match(tmp_path):
    model, opt = _model_and_opt(0)
    ck = DistributedCheckpointer(tmp_path, DistContext())
    torch.manual_seed(5)
    path = ck.save(model, opt, state=TrainState(step=1))
    after = torch.rand(3)
    torch.manual_seed(6)
    ck.load(path, model, opt)
    assert torch.equal(torch.rand(3), after)  # this rank's RNG continues where it was saved

    meta = json.loads((path / "distributed.json").read_text())
    (path / "distributed.json").write_text(json.dumps({**meta, "world_size": 4}))
    with pytest.raises(EmbedtuneError, match=r"written by 4 ranks .* --nproc-per-node × --nnodes = 4"):
        ck.load(path, model, opt)
    # Opt-in: weights and optimizer come back; the RNG is reseeded (reproducibly), not restored.
    want = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[2].weight.add_(1.0)
    ck.load(path, model, opt, allow_world_change=True)
    assert all(torch.equal(model.state_dict()[k], want[k]) for k in want)
    first = torch.rand(3)
    ck.load(path, model, opt, allow_world_change=True)
    assert torch.equal(torch.rand(3), first) and not torch.equal(first, after)


def test_rotation_keeps_the_newest(tmp_path):
    model, opt = _model_and_opt(0)
    ck = DistributedCheckpointer(tmp_path, DistContext(), keep_last=2)
    for step in range(1, 5):
        ck.save(model, opt, state=TrainState(step=step))
    assert [p.name for p in ck.list()] == ["step_00000003", "step_00000004"]
    shutil.rmtree(tmp_path / "step_00000004" / "dcp")
    assert ck.latest().name == "step_00000003"
