"""The checkpoint folder on disk: names, the commit marker, verification, atomic publishing, rotation.

Nothing here knows about models or torch; :class:`~embedtune.training.checkpoint.Checkpointer` writes
the files of a checkpoint into a staging folder and this module makes it visible atomically::

    <root>/
      step_00000040/            one committed checkpoint (see the package docstring for its files)
        checkpoint.json         the commit marker: written last, lists every file with size and CRC-32
      .tmp-step_00000060/       a save in progress (never resumed from unless it holds a marker)
      latest                    names the newest committed checkpoint (for people and tools)
      best                      names the best checkpoint by validation

Life of a save of step N (rank 0 does every step here; the other ranks only write files into staging):

1. :meth:`CheckpointFolder.stage` finishes or undoes any earlier interrupted save, then creates an
   empty ``.tmp-step_N``; every file of the checkpoint is written and fsynced inside it.
2. The marker ``checkpoint.json`` is written into it (temp file + fsync + rename): from now on the
   staging folder is a complete checkpoint.
3. :meth:`CheckpointFolder.publish`: if ``step_N`` exists (a re-save of the same step) it is renamed
   aside to ``.old-step_N``; ``.tmp-step_N`` is renamed to ``step_N``; ``.old-step_N`` is deleted.

A crash at any point leaves a complete ``step_N``, ``.tmp-step_N`` or ``.old-step_N``: discovery
(:meth:`CheckpointFolder.committed`) takes, for each step, the first of those that holds a marker, so
resuming always finds a complete checkpoint, and the next save tidies up (:meth:`CheckpointFolder.recover`).
Rotation deletes only committed checkpoints of this format beyond ``keep_last`` (and never ``best``);
folders it does not recognise are left alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from pathlib import Path
from typing import Any

from embedtune._atomic import fsync_dir
from embedtune.errors import EmbedtuneError

__all__ = [
    "FORMAT",
    "MARKER",
    "CheckpointError",
    "CheckpointFolder",
    "CheckpointWarning",
    "file_entry",
    "fsync_dir",
    "step_name",
]

FORMAT = "embedtune-checkpoint/1"
"""Written into every marker; a marker with another value is not this format."""
MARKER = "checkpoint.json"
"""The commit marker's file name: a checkpoint folder without it was never completed."""
_STEP = re.compile(r"^step_(\d{8,})$")
_TMP = ".tmp-"
_OLD = ".old-"
_CHUNK = 8 << 20


class CheckpointError(EmbedtuneError):
    """A checkpoint could not be written, found, verified, or does not fit this run."""


class CheckpointWarning(UserWarning):
    """Resuming skipped a damaged checkpoint and fell back to an earlier one."""


def step_name(step: int) -> str:
    """The folder name of the checkpoint of ``step`` (``step_00000040``)."""
    return f"step_{step:08d}"


def file_entry(path: Path, checksum: bool = True) -> list[int | None]:
    """``[size, crc32]`` of a file, read in chunks (``crc32`` None when ``checksum`` is off)."""
    size = path.stat().st_size
    if not checksum:
        return [size, None]
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return [size, crc]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that ``path`` holds either its old content or the complete new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class CheckpointFolder:
    """The checkpoints under one folder (see the module docstring).

    Args:
        root: the checkpoint folder (created by the first save).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # -- discovery (read-only, safe on every rank) -----------------------------------------------
    def committed(self) -> dict[int, Path]:
        """Step -> folder of every committed checkpoint: ``step_N``, else an unfinished publish's
        ``.tmp-step_N`` or ``.old-step_N`` (whichever holds a marker)."""
        if not self.root.is_dir():
            return {}
        found: dict[int, dict[str, Path]] = {}
        for p in self.root.iterdir():
            name = p.name
            kind = "final"
            if name.startswith(_TMP):
                kind, name = "tmp", name[len(_TMP) :]
            elif name.startswith(_OLD):
                kind, name = "old", name[len(_OLD) :]
            m = _STEP.match(name)
            if m and p.is_dir() and (p / MARKER).is_file():
                found.setdefault(int(m.group(1)), {})[kind] = p
        return {
            step: kinds.get("final") or kinds.get("tmp") or kinds["old"]
            for step, kinds in sorted(found.items())
        }

    def list(self) -> list[Path]:
        """Committed checkpoints, oldest first."""
        return list(self.committed().values())

    def find(self, name: str) -> Path | None:
        """The committed checkpoint called ``name`` (``step_00000040``), wherever a crash left it."""
        m = _STEP.match(name)
        return self.committed().get(int(m.group(1))) if m else None

    def pointer(self, name: str) -> Path | None:
        """The committed checkpoint the pointer file ``name`` (``latest``/``best``) names, or None."""
        f = self.root / name
        if not f.is_file():
            return None
        return self.find(f.read_text(encoding="utf-8").strip())

    def legacy(self) -> list[Path]:
        """``step_*`` folders of the format before this one (no marker, a ``trainer_state.json`` or
        ``dcp/.metadata``): never resumed from, never deleted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p
            for p in self.root.iterdir()
            if _STEP.match(p.name)
            and not (p / MARKER).exists()
            and ((p / "trainer_state.json").exists() or (p / "dcp" / ".metadata").exists())
        )

    # -- verification ------------------------------------------------------------------------------
    @staticmethod
    def read_marker(path: Path) -> dict[str, Any]:
        """The parsed marker of checkpoint ``path``.

        Raises:
            CheckpointError: no marker (an interrupted save), or one that is unreadable or of another
                format; the message names the file.
        """
        marker = Path(path) / MARKER
        if not marker.is_file():
            hint = (
                " (it was written by an earlier embedtune version, which this one cannot resume)"
                if (Path(path) / "trainer_state.json").exists() or (Path(path) / "dcp").exists()
                else " (the save was interrupted before it completed)"
            )
            raise CheckpointError(f"{path}: not a complete checkpoint, {marker.name} is missing{hint}")
        try:
            data = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(f"{marker}: unreadable checkpoint marker ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise CheckpointError(
                f"{marker}: not an embedtune checkpoint marker (format {got!r}, expected {FORMAT!r})"
            )
        for key in ("step", "world_size", "files", "train_state"):
            if key not in data:
                raise CheckpointError(f"{marker}: checkpoint marker lacks the field {key!r}")
        return data

    def problems(self, path: Path, *, checksums: bool = True, share: tuple[int, int] = (0, 1)) -> list[str]:
        """What is wrong with checkpoint ``path``: one line per missing, truncated or corrupt file.

        Sizes of every file are checked; CRC-32 checksums (a full read) of the files ``i`` with
        ``i % share[1] == share[0]``, so N ranks can split the reading.
        """
        try:
            marker = self.read_marker(path)
        except CheckpointError as exc:
            return [str(exc)]
        out: list[str] = []
        for i, (rel, (size, crc)) in enumerate(sorted(marker["files"].items())):
            f = Path(path) / rel
            if not f.is_file():
                out.append(f"{f}: missing")
                continue
            actual = f.stat().st_size
            if actual != size:
                out.append(f"{f}: truncated or overwritten ({actual} bytes, the checkpoint wrote {size})")
            elif checksums and crc is not None and i % share[1] == share[0] and file_entry(f)[1] != crc:
                out.append(f"{f}: corrupt (its CRC-32 differs from the one written with it)")
        return out

    # -- saving (rank 0 only) ------------------------------------------------------------------------
    def staging(self, step: int) -> Path:
        """Where the files of step ``step``'s checkpoint are written before it is published."""
        return self.root / f"{_TMP}{step_name(step)}"

    def stage(self, step: int) -> Path:
        """Tidy up interrupted saves, then create an empty staging folder for ``step``."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.recover()
        tmp = self.staging(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        return tmp

    def publish(self, step: int) -> Path:
        """Make the staged (marker-holding) checkpoint of ``step`` the committed ``step_N``, atomically
        replacing an earlier save of the same step."""
        name = step_name(step)
        final, tmp, old = self.root / name, self.staging(step), self.root / f"{_OLD}{name}"
        assert (tmp / MARKER).is_file(), "publish() needs a staged checkpoint with its marker"
        fsync_dir(tmp)
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)  # 1. the previous save of this step aside (still complete)
        os.rename(tmp, final)  # 2. the new one in
        fsync_dir(self.root)
        if old.exists():
            shutil.rmtree(old)  # 3. the previous one deleted
        return final

    def set_pointer(self, name: str, target: Path) -> None:
        """Point ``latest``/``best`` at ``target`` (write-temp + rename)."""
        tmp = self.root / f".{name}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(target.name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / name)
        fsync_dir(self.root)

    def recover(self) -> None:
        """Finish or undo interrupted saves: a complete ``.tmp-step_N``/``.old-step_N`` without a
        ``step_N`` becomes ``step_N``; every other ``.tmp-``/``.old-`` leftover is deleted."""
        if not self.root.is_dir():
            return
        for step, path in self.committed().items():
            final = self.root / step_name(step)
            if path != final and not final.exists():
                os.rename(path, final)
        fsync_dir(self.root)
        for p in self.root.iterdir():
            if p.name.startswith((_TMP, _OLD)) and _STEP.match(p.name.split("-", 1)[1]):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def rotate(self, keep_last: int, protect: set[Path]) -> list[Path]:
        """Delete committed checkpoints older than the ``keep_last`` newest, except ``protect``
        (e.g. ``best``); returns what was deleted. Only folders with this format's marker are touched."""
        done = [p for p in self.list() if _STEP.match(p.name)]
        keep = set(done[-keep_last:]) | {p.resolve() for p in protect} | set(protect)
        deleted = []
        for p in done:
            if p not in keep and p.resolve() not in keep:
                shutil.rmtree(p, ignore_errors=True)
                deleted.append(p)
        return deleted
