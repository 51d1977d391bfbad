"""Rank functions for test_checkpointer_ranks.py (spawned by _dist_harness.run_ranks; results via files)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from embedtune.training.checkpoint import Checkpointer, TrainState


def build(strategy: str, rank: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A small MLP with dropout (RNG matters), wrapped for ``strategy`` (``single`` = plain)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.2), nn.Tanh(), nn.Linear(16, 4))
    if strategy == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    elif strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[3], mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=0.05)


def step(model: nn.Module, opt: torch.optim.Optimizer) -> float:
    """One step on rank-local random data (draws from this rank's torch RNG, dropout too)."""
    opt.zero_grad()
    loss = model(torch.randn(4, 8)).pow(2).mean()
    loss.backward()
    opt.step()
    return loss.item()


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in sd.items()}  # a copy: the next steps change the params in place


def save_worker(rank: int, world: int, root: str, strategy: str, out: str) -> None:
    """3 steps, save step 3, then 2 more steps: record what a resumed run must reproduce."""
    model, opt = build(strategy, rank)
    torch.manual_seed(100 + rank)  # each rank its own stream
    for _ in range(3):
        step(model, opt)
    ck = Checkpointer(root, keep_last=2, strategy=strategy)
    seen_before = [p.name for p in ck.list()]
    ck.save(TrainState(step=3, step_in_epoch=3), model=model, optimizer=opt)
    weights = full_weights(model)
    losses = [step(model, opt) for _ in range(2)]
    if rank == 0:
        save_file(weights, str(Path(out) / "weights.safetensors"))
    result = {"seen_before": seen_before, "losses": losses, "listed": [p.name for p in ck.list()]}
    (Path(out) / f"save_{rank}.json").write_text(json.dumps(result))


def resume_worker(rank: int, world: int, root: str, strategy: str, out: str) -> None:
    """Other weights and RNG, then resume ``latest`` and repeat the 2 steps."""
    model, opt = build(strategy, rank)
    torch.manual_seed(999)
    ck = Checkpointer(root, keep_last=2, strategy=strategy)
    state = ck.load(ck.resolve("latest"), model=model, optimizer=opt)
    losses = [step(model, opt) for _ in range(2)]
    (Path(out) / f"resume_{rank}.json").write_text(json.dumps({"step": state.step, "losses": losses}))
