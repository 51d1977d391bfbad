"""``embedtune train ... --nproc-per-node N`` → torchrun: command line, checks, exit status after SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))

from embedtune.errors import ConfigError
from embedtune.launch import launch_requested, torchrun_argv
from embedtune.train import build_parser


def test_single_node_runs_the_train_module_with_a_local_rendezvous():
    argv = torchrun_argv(["r.yaml", "optimizer.lr=1e-5"], nproc_per_node=4)
    assert "--standalone" in argv
    assert argv[argv.index("--nproc-per-node") + 1] == "4"
    assert argv[-4:] == ["-m", "embedtune.train", "r.yaml", "optimizer.lr=1e-5"]


def test_several_nodes_need_a_rendezvous_endpoint():
    with pytest.raises(ConfigError, match=r"--rdzv-endpoint HOST:PORT"):
        torchrun_argv(["r.yaml"], nproc_per_node=8, nnodes="2")
    argv = torchrun_argv(
        ["r.yaml"], nproc_per_node=8, nnodes="2", rdzv_endpoint="node0:29400", rdzv_id="job7"
    )
    assert "--standalone" not in argv
    for flag, value in (
        ("--nnodes", "2"),
        ("--rdzv-backend", "c10d"),
        ("--rdzv-endpoint", "node0:29400"),
        ("--rdzv-id", "job7"),
    ):
        assert argv[argv.index(flag) + 1] == value
    with pytest.raises(ConfigError, match=r"--nnodes 'two'"):
        torchrun_argv(["r.yaml"], nproc_per_node=1, nnodes="two")
    with pytest.raises(ConfigError, match=r"--nproc-per-node 0"):
        torchrun_argv(["r.yaml"], nproc_per_node=0)


def test_launch_only_from_outside_torchrun(monkeypatch):
    args = build_parser().parse_args(["r.yaml", "a.b=1", "--nproc-per-node", "2"])
    assert args.recipe == "r.yaml" and args.overrides == ["a.b=1"] and args.nproc_per_node == 2
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert launch_requested(args)
    assert not launch_requested(build_parser().parse_args(["r.yaml"]))
    assert launch_requested(build_parser().parse_args(["r.yaml", "--nnodes", "2"]))
    monkeypatch.setenv("LOCAL_RANK", "0")  # inside torchrun: this process is a rank, train here
    assert not launch_requested(args)


LAUNCHER = """
import sys
from embedtune.launch import launch
from embedtune.train import build_parser
args = build_parser().parse_args(["x", "--nproc-per-node", "2"])
sys.exit(launch(sys.argv[2:], args, entry=[sys.argv[1]]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("target", ["launcher", "rank1"])
def test_sigterm_under_torchrun_saves_and_exits_143(tmp_path, target):
    """SIGTERM to the launcher (torchrun forwards it) or to rank 1 alone: both ranks save, status 143."""
    script = str(Path(__file__).with_name("_dist_train.py"))
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    with open(tmp_path / "launcher.log", "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                LAUNCHER,
                script,
                str(out),
                "--steps",
                "8",
                "--sleep",
                "1.0",
                "--no-consolidate",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 240
            progress = out / "progress_rank1"
            while not (
                progress.is_file() and progress.read_text().strip() and int(progress.read_text()) >= 2
            ):
                assert proc.poll() is None, (tmp_path / "launcher.log").read_text()
                assert time.monotonic() < deadline, "training did not start"
                time.sleep(0.2)
            if target == "launcher":
                os.kill(proc.pid, signal.SIGTERM)
            else:
                pids = subprocess.run(
                    ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
                ).stdout.split()
                ranks = {}
                for pid in pids:  # find rank 1 among our launcher's children by its environment
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    rank = next((e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")), None)
                    if rank is not None:
                        ranks[int(rank)] = int(pid)
                os.kill(ranks[1], signal.SIGTERM)
            code = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    logs = (tmp_path / "launcher.log").read_text(errors="replace")
    assert code == 143, logs[-4000:]
    latest = out / "ckpt" / (out / "ckpt" / "latest").read_text().strip()
    step = json.loads((latest / "checkpoint.json").read_text())["step"]  # the commit marker
    assert (latest / "state" / ".metadata").is_file() and 2 <= step < 8
    assert all((latest / f"rank_{r:05d}.safetensors").is_file() for r in (0, 1))


def test_an_unsplittable_batch_fails_before_any_process_starts(tmp_path, capsys):
    from _train_helpers import tiny_recipe, write_recipe

    from embedtune.train import main

    r = tiny_recipe(tmp_path)  # global 8, local 4
    recipe = write_recipe(tmp_path / "recipe.yaml", r)
    assert main([str(recipe), "--nproc-per-node", "3"]) == 2
    err = capsys.readouterr().err
    assert "global_batch_size=8 cannot be split over 3 ranks" in err and "use 6 or 9" in err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_overrides_may_follow_the_launch_options():
    from embedtune.train import build_parser

    args = build_parser().parse_intermixed_args(["r.yaml", "--nproc-per-node", "2", "a.b=1", "c=2"])
    assert (args.recipe, args.overrides, args.nproc_per_node) == ("r.yaml", ["a.b=1", "c=2"], 2)
