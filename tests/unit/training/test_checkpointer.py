"""The one checkpointer, in one process: exact round trip, damaged checkpoints, atomic re-save, fingerprints.

(Two gloo ranks saving and one process loading: tests/unit/distributed/test_checkpointer_ranks.py.)
"""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from embedtune.training.checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointWarning,
    Fingerprint,
    TrainState,
)
from embedtune.training.checkpoint import folder as folder_mod

REPO = Path(__file__).resolve().parents[3]


def _setup(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 3))
    model[0].bias.requires_grad_(False)  # frozen (as LoRA's base): neither stored nor restored
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _steps(model, opt, sched, n: int) -> list[float]:
    """n training steps that draw from every RNG (torch dropout + data, numpy, python)."""
    out = []
    for _ in range(n):
        opt.zero_grad()
        x = torch.randn(4, 6) * float(np.random.rand() + random.random())
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        out.append(loss.item())
    return out


def _save(ck: Checkpointer, step: int, seed: int = 0, **kw) -> Path:
    model, opt, sched = _setup(seed)
    _steps(model, opt, sched, 1)
    return ck.save(
        TrainState(step=step, step_in_epoch=step), model=model, optimizer=opt, scheduler=sched, **kw
    )


def test_round_trip_restores_weights_optimizer_schedule_and_every_rng_exactly(tmp_path):
    model, opt, sched = _setup(0)
    _steps(model, opt, sched, 3)
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    ck = Checkpointer(tmp_path / "ck")
    path = ck.save(
        TrainState(step=3, epoch=1, step_in_epoch=2, examples_seen=12, extra={"validator": {"best": 0.5}}),
        model=model,
        optimizer=opt,
        scheduler=sched,
    )
    want_lr = sched.get_last_lr()
    want_losses = _steps(model, opt, sched, 3)  # the uninterrupted continuation
    want = {k: v.clone() for k, v in model.state_dict().items()}
    want_opt = opt.state_dict()

    # "A new process": other weights, other RNG state, fresh optimizer and scheduler.
    model2, opt2, sched2 = _setup(1)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    state = Checkpointer(tmp_path / "ck").load(
        ck.resolve("latest"), model=model2, optimizer=opt2, scheduler=sched2
    )
    assert (state.step, state.epoch, state.step_in_epoch, state.examples_seen) == (3, 1, 2, 12)
    assert state.extra == {"validator": {"best": 0.5}}
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == want_lr
    model2[0].bias.data.copy_(want["0.bias"])  # frozen: comes from the model's source, not the checkpoint
    got_losses = _steps(model2, opt2, sched2, 3)
    assert got_losses == want_losses  # bitwise: same dropout masks, data draws, Adam moments, LRs
    for k in want:
        assert torch.equal(model2.state_dict()[k], want[k]), k
    got_opt = opt2.state_dict()
    for i, s in want_opt["state"].items():
        for name, t in s.items():
            assert torch.equal(got_opt["state"][i][name], t), (i, name)
    assert got_opt["param_groups"][0]["lr"] == want_opt["param_groups"][0]["lr"]
    assert path.name == "step_00000003"


def test_a_parameter_never_stepped_has_no_optimizer_state_after_resume_either(tmp_path):
    # BERT's pooler under a mean-pooled encoder: trainable, but never given a gradient.
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(4, 2), "unused": nn.Linear(4, 2)})
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model["used"](torch.randn(3, 4)).sum().backward()
        opt.step()
    path = Checkpointer(tmp_path).save(TrainState(step=2), model=model, optimizer=opt)
    torch.manual_seed(1)
    model2 = nn.ModuleDict({"used": nn.Linear(4, 2), "unused": nn.Linear(4, 2)})
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    Checkpointer(tmp_path).load(path, model=model2, optimizer=opt2)
    want, got = opt.state_dict(), opt2.state_dict()
    assert sorted(got["state"]) == sorted(want["state"]) == [0, 1]  # the used layer's weight and bias only
    for i in want["state"]:
        for k, v in want["state"][i].items():
            assert torch.equal(got["state"][i][k], v)
    assert torch.equal(model2["unused"].weight, model["unused"].weight)


def test_the_layout_is_one_marker_dcp_state_and_a_rank_file(tmp_path):
    ck = Checkpointer(tmp_path, strategy="single")
    path = _save(ck, 4, fingerprint=Fingerprint.of({"optimizer": {"lr": 0.1}}))
    marker = json.loads((path / "checkpoint.json").read_text())
    assert marker["format"] == folder_mod.FORMAT
    assert (marker["step"], marker["world_size"], marker["strategy"]) == (4, 1, "single")
    assert set(marker["files"]) == {"rank_00000.safetensors", "state/.metadata", "state/__0_0.distcp"}
    assert marker["fingerprint"]["config"] == {"optimizer.lr": 0.1}
    assert marker["scheduler"]["last_epoch"] == 1
    assert (tmp_path / "latest").read_text() == "step_00000004"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging leftovers
    # The frozen bias is not stored (LoRA checkpoints hold the adapter only).
    assert b"0.bias" not in (path / "state" / ".metadata").read_bytes()


def _damage(path: Path, how: str) -> Path:
    """Damage one file of checkpoint ``path``; returns the damaged file."""
    distcp = path / "state" / "__0_0.distcp"
    if how == "truncated":
        data = distcp.read_bytes()
        distcp.write_bytes(data[: len(data) // 2])
        return distcp
    if how == "missing":
        (path / "rank_00000.safetensors").unlink()
        return path / "rank_00000.safetensors"
    if how == "garbage":  # same size, other bytes: only the checksum can tell
        distcp.write_bytes(os.urandom(distcp.stat().st_size))
        return distcp
    if how == "garbage-marker":
        (path / "checkpoint.json").write_text("{not json")
        return path / "checkpoint.json"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "missing", "garbage", "garbage-marker"])
def test_a_damaged_newest_checkpoint_falls_back_with_a_warning_naming_the_file(tmp_path, how, capsys):
    ck = Checkpointer(tmp_path, keep_last=3)
    _save(ck, 1, seed=1)
    second = _save(ck, 2, seed=2)
    bad_file = _damage(second, how)

    with pytest.warns(CheckpointWarning, match=rf"{bad_file.name}.*resuming from step_00000001"):
        chosen = ck.resolve("latest")
    assert chosen.name == "step_00000001"
    assert str(bad_file) in capsys.readouterr().err  # also printed, for logs
    with pytest.warns(CheckpointWarning):
        assert ck.resolve("auto").name == "step_00000001"
    model, opt, sched = _setup(9)
    assert ck.load(chosen, model=model, optimizer=opt, scheduler=sched).step == 1

    # Naming the damaged checkpoint itself is an error that names the file, never a raw traceback.
    with pytest.raises(CheckpointError, match=rf"{bad_file.name}"):
        ck.resolve(str(second))
    with pytest.raises(CheckpointError, match=rf"{bad_file.name}"):
        ck.load(second, model=model, optimizer=opt)


def test_every_checkpoint_damaged_is_an_error_listing_them(tmp_path):
    ck = Checkpointer(tmp_path)
    _damage(_save(ck, 1), "truncated")
    with pytest.raises(CheckpointError, match=r"every checkpoint .* damaged.*step_00000001.*truncated"):
        ck.resolve("latest")
    assert Checkpointer(tmp_path / "empty").resolve("auto") is None
    with pytest.raises(CheckpointError, match=r"no checkpoint in"):
        Checkpointer(tmp_path / "empty").resolve("latest")


_CRASH = textwrap.dedent(
    """
    import os, sys
    import torch
    from embedtune.training.checkpoint import Checkpointer, TrainState
    from embedtune.training.checkpoint import folder

    root, crash_at = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ck = Checkpointer(root)
    torch.nn.init.constant_(model.weight, 1.0)
    ck.save(TrainState(step=2), model=model)
    torch.nn.init.constant_(model.weight, 2.0)
    calls = {"rename": 0}
    real_rename, real_write = os.rename, folder.write_json_atomic

    def rename(a, b):  # die like SIGKILL (no cleanup) at the chosen point of the publish
        real_rename(a, b)
        if os.path.dirname(os.path.abspath(a)) != os.path.abspath(root):
            return  # DCP's own renames inside the staging folder
        calls["rename"] += 1
        if (crash_at, calls["rename"]) in (("after-aside", 1), ("after-swap", 2)):
            os._exit(9)

    def write_json_atomic(path, data):
        if crash_at == "before-marker":
            os._exit(9)
        real_write(path, data)

    folder.os.rename = rename
    folder.write_json_atomic = write_json_atomic
    import embedtune.training.checkpoint.checkpointer as c
    c.write_json_atomic = write_json_atomic
    ck.save(TrainState(step=2), model=model)  # the re-save of step 2
    """
)


@pytest.mark.parametrize("crash_at", ["before-marker", "after-aside", "after-swap"])
def test_a_crash_during_a_re_save_still_resumes(tmp_path, crash_at):
    root = tmp_path / "ck"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(root), crash_at], env=env, capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    names = sorted(p.name for p in root.iterdir())
    expect_leftover = {"before-marker": ".tmp-step_00000002", "after-aside": ".old-step_00000002"}
    if crash_at in expect_leftover:
        assert expect_leftover[crash_at] in names, names  # the crash really hit mid-publish

    ck = Checkpointer(root)
    path = ck.resolve("latest")
    model = torch.nn.Linear(4, 3)
    assert ck.load(path, model=model).step == 2
    # The old save (weights 1) or the new one (weights 2), complete either way — never a mix.
    want = {"before-marker": 1.0, "after-aside": 2.0, "after-swap": 2.0}[crash_at]
    assert torch.equal(model.weight, torch.full((3, 4), want))
    # The next save tidies up: no staging or set-aside folders remain.
    ck.save(TrainState(step=3), model=model)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000003"]


def test_a_changed_recipe_or_data_is_refused_by_name(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"query": "q", "pos_doc": "p"}\n')
    recipe = {
        "optimizer": {"lr": 1e-5},
        "step_scheduler": {"max_steps": 10, "global_batch_size": 8},
        "data": {"datasets": [{"path": str(data)}]},
    }
    fp = Fingerprint.of(recipe, [data])
    ck = Checkpointer(tmp_path / "ck")
    path = _save(ck, 1, fingerprint=fp)
    model, opt, sched = _setup(0)

    # Keys that legitimately change on resume: accepted silently.
    longer = {
        **recipe,
        "step_scheduler": {"max_steps": 50, "global_batch_size": 8},
        "output_dir": "elsewhere",
    }
    ck.load(path, model=model, optimizer=opt, scheduler=sched, fingerprint=Fingerprint.of(longer, [data]))

    changed = {
        **recipe,
        "optimizer": {"lr": 2e-5},
        "step_scheduler": {"max_steps": 10, "global_batch_size": 16},
    }
    with pytest.raises(CheckpointError, match=r"optimizer\.lr: 1e-05 -> 2e-05.*global_batch_size: 8 -> 16"):
        ck.load(path, model=model, optimizer=opt, fingerprint=Fingerprint.of(changed, [data]))
    data.write_text('{"query": "q2", "pos_doc": "p"}\n')
    with pytest.raises(CheckpointError, match=rf"data file {data}: content changed"):
        ck.load(path, model=model, optimizer=opt, fingerprint=Fingerprint.of(recipe, [data]))

    # The explicit override resumes, saying what changed.
    with pytest.warns(CheckpointWarning, match=r"optimizer\.lr: 1e-05 -> 2e-05"):
        state = ck.load(
            path,
            model=model,
            optimizer=opt,
            fingerprint=Fingerprint.of(changed, [data]),
            allow_config_change=True,
        )
    assert state.step == 1


def test_rotation_keeps_the_newest_and_best_and_never_touches_other_folders(tmp_path):
    legacy = tmp_path / "step_00000000"  # a checkpoint of the format before this one
    legacy.mkdir(parents=True)
    (legacy / "trainer_state.json").write_text("{}")
    (tmp_path / "notes").mkdir()
    ck = Checkpointer(tmp_path, keep_last=2)
    _save(ck, 1, is_best=True)
    for step in (2, 3, 4):
        _save(ck, step)
    assert [p.name for p in ck.list()] == ["step_00000001", "step_00000003", "step_00000004"]
    assert ck.best().name == "step_00000001" and ck.latest().name == "step_00000004"
    assert legacy.is_dir() and (tmp_path / "notes").is_dir()
    with pytest.raises(CheckpointError, match=r"earlier embedtune version"):
        ck.resolve(str(legacy))


_FULL_DISK_AT = {
    "rng": "embedtune.training.checkpoint.checkpointer.st_save_file",
    "dcp": "torch.distributed.checkpoint.FileSystemWriter.write_data",
    "marker": "embedtune.training.checkpoint.checkpointer.write_json_atomic",
    "publish": "embedtune.training.checkpoint.folder.CheckpointFolder.publish",
}


@pytest.mark.parametrize("where", sorted(_FULL_DISK_AT))
def test_a_full_disk_anywhere_in_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    ck = Checkpointer(tmp_path)
    first = _save(ck, 1)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_FULL_DISK_AT[where], full)
    with pytest.raises(CheckpointError, match=r"No space left.*step_00000001 is intact.*resume=latest"):
        _save(ck, 2)
    assert ck.list() == [first] and ck.resolve("latest") == first
    assert (tmp_path / "latest").read_text() == first.name
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_dcp_metadata_is_never_unpickled_into_arbitrary_objects(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path / "ck")
    path = _save(ck, 1)
    # A crafted checkpoint (someone else's folder): its .metadata runs code when unpickled naively.
    meta = path / "state" / ".metadata"
    meta.write_bytes(pickle.dumps(_Payload()))
    marker = json.loads((path / "checkpoint.json").read_text())
    marker["files"]["state/.metadata"] = folder_mod.file_entry(meta)
    (path / "checkpoint.json").write_text(json.dumps(marker))
    monkeypatch.chdir(tmp_path)
    model, opt, _ = _setup(0)
    with pytest.raises(CheckpointError, match=r"refusing to load posix\.system|refusing to load os\.system"):
        ck.load(path, model=model, optimizer=opt)
    assert not (tmp_path / "PWNED").exists()


def test_a_checkpoint_of_another_model_is_refused_clearly(tmp_path):
    ck = Checkpointer(tmp_path)
    path = _save(ck, 1)
    other = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3))
    with pytest.raises(CheckpointError, match=r"lacks 5 model weights this run trains \(e\.g\. 0\.bias"):
        ck.load(path, model=other)


def test_another_number_of_ranks_is_refused_unless_allowed(tmp_path):
    # What rank 0 of a 2-rank job writes for a replicated model (the 2-rank run itself: the slow test in
    # tests/unit/distributed/test_checkpointer_ranks.py).
    model, opt, sched = _setup(0)
    _steps(model, opt, sched, 1)
    path = Checkpointer(tmp_path, world_size=2).save(TrainState(step=1), model=model, optimizer=opt)
    other, other_opt, _ = _setup(1)
    ck = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match=r"written by 2 rank\(s\) but this run has 1.*nproc-per-node"):
        ck.load(path, model=other, optimizer=other_opt)
    with pytest.warns(CheckpointWarning, match=r"\(2 ranks\) on 1.*reseeded"):
        ck.load(path, model=other, optimizer=other_opt, allow_world_change=True)
    assert torch.equal(other[3].weight, model[3].weight)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_round_trip_restores_gpu_weights_optimizer_and_the_cuda_rng(tmp_path):
    def build(seed: int):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 64), nn.Dropout(0.2), nn.Linear(64, 8)).cuda()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    def run(model, opt, n: int) -> list[float]:
        out = []
        for _ in range(n):
            opt.zero_grad()
            loss = model(torch.randn(16, 64, device="cuda")).pow(2).mean()  # CUDA RNG: data and dropout
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    model, opt = build(0)
    run(model, opt, 2)
    torch.cuda.manual_seed_all(11)
    ck = Checkpointer(tmp_path)
    path = ck.save(TrainState(step=2), model=model, optimizer=opt)
    want = run(model, opt, 3)
    model2, opt2 = build(1)
    torch.cuda.manual_seed_all(0)
    ck.load(path, model=model2, optimizer=opt2)
    assert (
        next(model2.parameters()).is_cuda and opt2.state[opt2.param_groups[0]["params"][0]]["exp_avg"].is_cuda
    )
    assert run(model2, opt2, 3) == want


def test_a_changed_corpus_folder_of_a_corpus_id_file_is_refused(tmp_path):
    """The corpus-ID layout keeps documents in a folder the JSON names: changing them changes the data."""
    import json

    from embedtune.training.checkpoint import data_paths

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "merlin_metadata.json").write_text('{"class": "TextQADataset", "corpus_id": "c"}')
    (corpus / "docs.jsonl").write_text('{"id": "d1", "text": "one"}\n')
    data = tmp_path / "train.json"
    data.write_text(
        json.dumps({"corpus": [{"path": "corpus"}], "data": [{"question": "q", "pos_doc": [{"id": "d1"}]}]})
    )
    recipe = {"data": {"datasets": [{"path": str(data)}]}}
    paths = data_paths(recipe)
    assert paths == [data, corpus]
    # the "corpus" value found after the data list too (the whole file is read then)
    late = tmp_path / "late.json"
    late.write_text(
        '{"data": ['
        + ",".join(['{"question": "q", "pos_doc": [{"id": "d1"}]}'] * 30000)
        + '], "corpus": {"path": "corpus"}}'
    )
    assert late.stat().st_size > 1 << 20 and data_paths({"data": {"datasets": [{"path": str(late)}]}}) == [
        late,
        corpus,
    ]

    ck = Checkpointer(tmp_path / "ck")
    path = _save(ck, 1, fingerprint=Fingerprint.of(recipe, paths))
    model, opt, _ = _setup(0)
    ck.load(path, model=model, optimizer=opt, fingerprint=Fingerprint.of(recipe, data_paths(recipe)))
    (corpus / "docs.jsonl").write_text('{"id": "d1", "text": "one, edited"}\n')
    with pytest.raises(CheckpointError, match=rf"{corpus}: content changed"):
        ck.load(path, model=model, optimizer=opt, fingerprint=Fingerprint.of(recipe, data_paths(recipe)))
