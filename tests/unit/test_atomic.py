"""embedtune._atomic: a crash at any step leaves the previous version of a file or folder intact."""

from __future__ import annotations

import os
import stat

import pytest

from embedtune import _atomic
from embedtune._atomic import recover_folder, staged_folder, write_json, write_text


class Crash(Exception):
    """Stands for the process dying at the injected step."""


def _tree(root):
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _old_model(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("old config")
    (target / "sub").mkdir()
    (target / "sub" / "weights").write_text("old weights")
    return target, _tree(target)


def test_file_write_replaces_and_keeps_plain_permissions(tmp_path):
    p = write_json(tmp_path / "a" / "x.json", {"k": 1})
    assert p.read_text() == '{\n  "k": 1\n}\n'
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask
    write_text(p, "new")
    assert p.read_text() == "new" and [f.name for f in p.parent.iterdir()] == ["x.json"]


def test_a_failing_file_write_leaves_the_old_file_and_no_temporary(tmp_path):
    p = write_text(tmp_path / "x.txt", "old")
    with pytest.raises(Crash), _atomic.atomic_file(p) as f:
        f.write("half of the new")
        raise Crash
    assert p.read_text() == "old" and [f.name for f in tmp_path.iterdir()] == ["x.txt"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_staged_folder_replaces_the_previous_version_completely(tmp_path, monkeypatch, exchange):
    if exchange and _atomic._exchange is None:
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    if not exchange:
        monkeypatch.setattr(_atomic, "_exchange", None)
    target, _ = _old_model(tmp_path)
    with staged_folder(target) as new:
        (new / "config.json").write_text("new config")
    assert _tree(target) == {"config.json": "new config"}  # no stale file of the old version survives
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # nothing left beside it


def test_an_exception_while_writing_the_new_version_leaves_the_old_one(tmp_path):
    target, before = _old_model(tmp_path)
    with pytest.raises(Crash), staged_folder(target) as new:
        (new / "config.json").write_text("half")
        raise Crash
    assert _tree(target) == before and [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.mark.parametrize("fail_at", [1, 2], ids=["moving-old-aside", "moving-new-in"])
def test_a_failed_rename_leaves_the_previous_version_in_place(tmp_path, monkeypatch, fail_at):
    monkeypatch.setattr(_atomic, "_exchange", None)
    target, before = _old_model(tmp_path)
    real, calls = _atomic._rename, []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == fail_at:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(_atomic, "_rename", rename)
    with pytest.raises(OSError, match="No space"), staged_folder(target) as new:
        (new / "config.json").write_text("new")
    assert _tree(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_process_killed_between_the_two_renames_is_recovered_by_the_next_write(tmp_path):
    target, before = _old_model(tmp_path)
    aside = tmp_path / f".model{_atomic._OLD}999"
    os.rename(target, aside)  # the state a SIGKILL right after "rename the old folder aside" leaves
    assert recover_folder(target) and _tree(target) == before and not aside.exists()
    os.rename(target, aside)
    with staged_folder(target) as new:  # the next write puts the old version back, then replaces it
        (new / "config.json").write_text("new")
    assert _tree(target) == {"config.json": "new"} and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_file_where_the_folder_should_be_is_not_replaced(tmp_path):
    (tmp_path / "model").write_text("a user's file")
    with pytest.raises(FileExistsError), staged_folder(tmp_path / "model") as new:
        (new / "x").write_text("y")
    assert (tmp_path / "model").read_text() == "a user's file"
