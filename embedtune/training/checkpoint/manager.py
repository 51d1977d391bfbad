"""The single-process checkpoint manager being replaced by :class:`~embedtune.training.checkpoint.Checkpointer`.

Layout of a checkpoint folder (one per saved step)::

    <checkpoint_dir>/
      step_00000040/
        model.safetensors      trainable weights (LoRA: only the adapter weights)
        optimizer.pt           optimizer state (tensors + plain values; loaded with weights_only=True)
        scheduler.json         LR scheduler state
        rng.safetensors        python, numpy and torch RNG states
        trainer_state.json     step, epoch, step-in-epoch, best metric, ... (written last)
      latest                   text file naming the newest complete checkpoint (updated last)
      best                     text file naming the best checkpoint by the validation metric

Atomicity: a checkpoint is written into ``.tmp-step_...`` with every file fsynced, then renamed into
place (a rename is atomic on POSIX), and only then is ``latest`` replaced (write-temp + ``os.replace``).
A crash at any point leaves either the old state or the new one, never a half-written checkpoint that
``resume: latest`` would pick. A failed save (e.g. ``ENOSPC``) removes its temporary folder and raises
:class:`CheckpointError` naming the intact previous checkpoint.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from embedtune.training.checkpoint.checkpointer import TrainState
from embedtune.training.checkpoint.folder import CheckpointError
from embedtune.training.checkpoint.rng import capture_rng_state, restore_rng_state

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointManager",
    "TrainState",
    "capture_rng_state",
    "restore_rng_state",
]

_PREFIX = "step_"
_TMP = ".tmp-"


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    model: dict[str, Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    state: TrainState


# --------------------------------------------------------------------------------------------------
# Low-level durable writes (the one place that touches the disk, so tests can inject failures)
# --------------------------------------------------------------------------------------------------
def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _safetensors_bytes(tensors: dict[str, Tensor]) -> bytes:
    # Clone so that tied weights (shared storage) are stored as separate tensors; safetensors refuses
    # shared storage, and load_state_dict re-ties them anyway.
    return st_save({k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()})


class CheckpointManager:
    """Save, find, load and rotate checkpoints under one folder.

    Args:
        root: the checkpoint folder (created on first save).
        keep_last: how many of the newest checkpoints to keep (the best one is kept as well).
    """

    def __init__(self, root: str | Path, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        self.root = Path(root)
        self.keep_last = keep_last

    # -- discovery -------------------------------------------------------------------------------
    def _read_pointer(self, name: str) -> Path | None:
        pointer = self.root / name
        if not pointer.is_file():
            return None
        target = self.root / pointer.read_text(encoding="utf-8").strip()
        return target if (target / "trainer_state.json").is_file() else None

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = self._read_pointer("latest")
        if found is not None:
            return found
        # No pointer (e.g. crash between rename and pointer update): the highest complete step folder.
        done = self.list()
        return done[-1] if done else None

    def best(self) -> Path | None:
        """The checkpoint with the best validation metric, or None."""
        return self._read_pointer("best")

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        dirs = [
            p
            for p in self.root.iterdir()
            if p.is_dir() and p.name.startswith(_PREFIX) and (p / "trainer_state.json").is_file()
        ]
        return sorted(dirs, key=lambda p: int(p.name[len(_PREFIX) :]))

    # -- saving ------------------------------------------------------------------------------------
    def save(
        self,
        *,
        model: dict[str, Tensor],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        state: TrainState,
        rng: dict[str, Any] | None = None,
        is_best: bool = False,
    ) -> Path:
        """Write a complete checkpoint atomically and update ``latest`` (and ``best``).

        Raises:
            CheckpointError: the checkpoint could not be written (disk full, permissions); the previous
                checkpoint and ``latest`` are untouched.
        """
        name = f"{_PREFIX}{state.step:08d}"
        final = self.root / name
        tmp = self.root / f"{_TMP}{name}-{os.getpid()}"
        previous = self.latest()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            files: list[tuple[str, bytes]] = [
                ("model.safetensors", _safetensors_bytes(model)),
                ("optimizer.pt", _torch_bytes(optimizer)),
                ("scheduler.json", json.dumps(scheduler).encode()),
                ("rng.safetensors", st_save(rng if rng is not None else capture_rng_state())),
                # Last: its presence marks the folder complete.
                ("trainer_state.json", json.dumps(asdict(state), indent=1).encode()),
            ]
            for fname, data in files:
                _write_bytes(tmp / fname, data)
            _fsync_dir(tmp)
            if final.exists():  # re-saving the same step (e.g. final save after a periodic one)
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._write_pointer("latest", name)
            if is_best:
                self._write_pointer("best", name)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            for pointer in ("latest", "best"):
                (self.root / f"{_TMP}{pointer}-{os.getpid()}").unlink(missing_ok=True)
            kept = (
                f"the previous checkpoint {previous} is intact"
                if previous
                else "no earlier checkpoint exists"
            )
            why = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror or str(exc)
            raise CheckpointError(
                f"could not save the checkpoint for step {state.step} in {self.root} ({why}); {kept}. "
                "Free space (or lower checkpoint.keep_last) and resume with checkpoint.resume=latest."
            ) from exc
        self._rotate()
        return final

    def _write_pointer(self, name: str, target: str) -> None:
        tmp = self.root / f"{_TMP}{name}-{os.getpid()}"
        _write_bytes(tmp, target.encode())
        os.replace(tmp, self.root / name)
        _fsync_dir(self.root)

    def _rotate(self) -> None:
        keep = set(self.list()[-self.keep_last :])
        for p in (self.latest(), self.best()):
            if p is not None:
                keep.add(p)
        for p in self.list():
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)
        # Leftovers of a crashed save by a process that no longer runs.
        for p in self.root.glob(f"{_TMP}*"):
            if not p.name.endswith(f"-{os.getpid()}"):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    # -- loading -----------------------------------------------------------------------------------
    def resolve(self, resume: str) -> Path:
        """Turn ``checkpoint.resume`` (``latest``, ``best`` or a folder) into a checkpoint path.

        Raises:
            CheckpointError: nothing to resume from.
        """
        if resume in ("latest", "best"):
            found = self.latest() if resume == "latest" else self.best()
            if found is None:
                raise CheckpointError(f"checkpoint.resume={resume}: no complete checkpoint in {self.root}")
            return found
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise CheckpointError(
                f"checkpoint.resume={resume}: not a complete checkpoint folder (no trainer_state.json)"
            )
        return path

    @staticmethod
    def load(path: str | Path) -> Checkpoint:
        """Read a checkpoint folder (tensors only: safetensors and ``torch.load(weights_only=True)``)."""
        p = Path(path)
        try:
            model = st_load((p / "model.safetensors").read_bytes())
            optimizer = torch.load(p / "optimizer.pt", map_location="cpu", weights_only=True)
            scheduler = json.loads((p / "scheduler.json").read_text())
            rng = st_load((p / "rng.safetensors").read_bytes())
            state = TrainState(**json.loads((p / "trainer_state.json").read_text()))
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{p}: cannot read checkpoint: {exc}") from exc
        return Checkpoint(path=p, model=model, optimizer=optimizer, scheduler=scheduler, rng=rng, state=state)
