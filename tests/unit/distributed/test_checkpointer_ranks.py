"""The one checkpointer on 2 gloo ranks (DDP and FSDP2): exact resume on 2 ranks, and one process
reads the same folder — refused by default (the world size changed), resharded by DCP when allowed.

(The refusal alone, without spawning ranks, is in tests/unit/training/test_checkpointer.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from _ckpt_workers import build, resume_worker, save_worker
from _dist_harness import run_ranks
from safetensors.torch import load_file

from embedtune.training.checkpoint import Checkpointer, CheckpointError, CheckpointWarning, TrainState


@pytest.mark.slow  # 4 spawns of 2 ranks: ~70 s per strategy on 2 shared cores
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_ranks_save_two_resume_exactly_and_one_process_reshards_or_refuses(tmp_path, strategy):
    root, out = tmp_path / "ck", tmp_path / "out"
    out.mkdir()
    # A single-process checkpoint already in the folder: the 2-rank run sees it, and its rotation
    # (keep_last=2) keeps it — one marker, one layout for both kinds.
    model, opt = build("single")
    Checkpointer(root, keep_last=2).save(TrainState(step=1), model=model, optimizer=opt)

    run_ranks(save_worker, 2, str(root), strategy, str(out))
    saved = [json.loads((out / f"save_{r}.json").read_text()) for r in range(2)]
    assert saved[0]["seen_before"] == saved[1]["seen_before"] == ["step_00000001"]
    assert saved[0]["listed"] == ["step_00000001", "step_00000003"]
    marker = json.loads((root / "step_00000003" / "checkpoint.json").read_text())
    assert (marker["world_size"], marker["strategy"]) == (2, strategy)
    assert {"rank_00000.safetensors", "rank_00001.safetensors"} <= set(marker["files"])

    # 2 ranks resume: each rank's RNG and the (sharded) optimizer come back; the same losses follow.
    run_ranks(resume_worker, 2, str(root), strategy, str(out))
    for r in range(2):
        resumed = json.loads((out / f"resume_{r}.json").read_text())
        assert resumed["step"] == 3
        assert resumed["losses"] == saved[r]["losses"], f"rank {r}"  # bitwise
    assert saved[0]["losses"] != saved[1]["losses"]  # the ranks really have their own streams

    # One process, plain model: refused by default, naming both world sizes...
    ck = Checkpointer(root)
    plain, plain_opt = build("single")
    torch.nn.init.zeros_(plain[0].weight)
    with pytest.raises(
        CheckpointError, match=r"written by 2 rank\(s\) but this run has 1.*resume_on_other_world_size"
    ):
        ck.load(ck.resolve("latest"), model=plain, optimizer=plain_opt)
    # ...and resharded by DCP when allowed: the full weights rank 0 gathered at step 3.
    with pytest.warns(CheckpointWarning, match=r"reseeded"):
        state = ck.load(ck.resolve("latest"), model=plain, optimizer=plain_opt, allow_world_change=True)
    assert state.step == 3
    want = load_file(str(out / "weights.safetensors"))
    got = plain.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
