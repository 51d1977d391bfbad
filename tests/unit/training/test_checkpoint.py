"""Atomic checkpoints: round trip, rotation, crash during save."""

from __future__ import annotations

import errno
import random

import numpy as np
import pytest
import torch

from embedtune.training.checkpoint import (
    CheckpointError,
    CheckpointManager,
    TrainState,
    capture_rng_state,
    restore_rng_state,
)
from embedtune.training.checkpoint import manager as ckpt_mod


def _save(mgr, step, value=0.0, **kw):
    model = {"w": torch.full((3, 2), float(value)), "b": torch.arange(3.0)}
    opt = {
        "state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.ones(3)}},
        "param_groups": [{"lr": 0.1, "params": [0], "betas": (0.9, 0.99)}],
    }
    return mgr.save(
        model=model,
        optimizer=opt,
        scheduler={"last_epoch": step},
        state=TrainState(step=step, epoch=1, step_in_epoch=step % 3),
        **kw,
    )


def test_round_trip(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    path = _save(mgr, 7, value=1.5)
    assert mgr.latest() == path
    ck = mgr.load(path)
    assert torch.equal(ck.model["w"], torch.full((3, 2), 1.5))
    assert ck.optimizer["param_groups"][0]["betas"] == (0.9, 0.99)
    assert ck.scheduler == {"last_epoch": 7}
    assert (ck.state.step, ck.state.epoch, ck.state.step_in_epoch) == (7, 1, 1)


def test_rng_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    want = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2])


def test_keep_last_n_and_best_is_kept(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    _save(mgr, 1)
    _save(mgr, 2, is_best=True)
    for s in (3, 4, 5):
        _save(mgr, s)
    names = [p.name for p in mgr.list()]
    assert names == ["step_00000002", "step_00000004", "step_00000005"]
    assert mgr.best().name == "step_00000002"
    assert mgr.latest().name == "step_00000005"


@pytest.mark.parametrize("fail_at", [1, 3, 5, 6])
def test_enospc_on_kth_write_keeps_previous_checkpoint(tmp_path, monkeypatch, fail_at):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    good = _save(mgr, 10, value=1.0)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    real = ckpt_mod._write_bytes
    calls = {"n": 0}

    def flaky(path, data):
        calls["n"] += 1
        if calls["n"] == fail_at:  # 1-5: the checkpoint's files, 6: the `latest` pointer
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ckpt_mod, "_write_bytes", flaky)
    with pytest.raises(CheckpointError, match=r"disk is full.*step_00000010 is intact"):
        _save(mgr, 20, value=2.0)
    monkeypatch.setattr(ckpt_mod, "_write_bytes", real)

    # Whatever was written, resume picks a complete checkpoint whose content is the old one or,
    # only if the folder was fully renamed into place before the pointer failed, the new complete one.
    latest = mgr.latest()
    assert (tmp_path / "latest").read_text() == "step_00000010"
    if fail_at <= 5:
        assert latest == good
        assert [p.name for p in mgr.list()] == ["step_00000010"]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert not list(tmp_path.glob(".tmp-*"))
    assert mgr.load(mgr.resolve("latest")).state.step in (10, 20)


def test_incomplete_folder_is_never_resumed(tmp_path):
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 3)
    (tmp_path / "step_00000009").mkdir()  # a folder without trainer_state.json (foreign or broken)
    (tmp_path / "latest").unlink()
    assert mgr.latest().name == "step_00000003"


def test_resolve_errors_name_the_option(tmp_path):
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError, match=r"checkpoint\.resume=latest: no complete checkpoint"):
        mgr.resolve("latest")
    with pytest.raises(CheckpointError, match="not a complete checkpoint folder"):
        mgr.resolve(str(tmp_path))
