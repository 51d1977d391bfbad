"""The DCP checkpointer of the distributed recipe (moved here from ``training/distributed.py``).

Being replaced by the one checkpointer of :mod:`embedtune.training.checkpoint` (issue #11).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DistributedCheckpointer"]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


_PREFIX = "step_"
_DCP = "dcp"
_META = ".metadata"


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    # DCP warns on every single-process save/load that it "assumes" one process: that is the intent.
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


class DistributedCheckpointer:
    """Save and restore training state from all ranks at once, with DCP.

    Layout of one checkpoint (a shared filesystem is needed across nodes)::

        <root>/step_00000040/
          trainer_state.json     step, epoch, step-in-epoch (the data position), ... (rank 0)
          scheduler.json         LR scheduler state (rank 0)
          distributed.json       world size and strategy that wrote it (rank 0)
          rank_00000.json        this rank's data position and rank/world (every rank)
          rank_00000.safetensors this rank's python/numpy/torch(/CUDA) RNG states (every rank)
          dcp/                   model + optimizer through torch.distributed.checkpoint: each rank writes
            __0_0.distcp ...     its own shards (DDP: replicated tensors written once)
            .metadata            written last, by rank 0, after every rank's files are on disk
        <root>/latest            names the newest complete checkpoint

    ``dcp/.metadata`` is the commit marker: every other file is written and fsynced *before* the DCP
    save starts, and DCP writes its metadata (temp file + rename) only after all ranks report their
    shards written. A folder without it is an interrupted save and is never resumed from.
    LoRA: only trainable parameters (and their optimizer state) are stored; the frozen base is
    reloaded from its source.

    Args:
        root: the checkpoint folder.
        ctx: the distributed context (default: the current one).
        keep_last: newest checkpoints to keep (plus the best one).
        strategy: recorded in ``distributed.json`` (informational).
    """

    def __init__(
        self,
        root: str | Path,
        ctx: Any = None,
        *,
        keep_last: int = 2,
        strategy: str = "ddp",
    ) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        self.root = Path(root)
        from embedtune.training import distributed as D

        self.ctx = ctx or D.get_context()
        self.keep_last = keep_last
        self.strategy = strategy

    # -- discovery ------------------------------------------------------------------------------
    @staticmethod
    def is_complete(path: Path) -> bool:
        """True when ``path`` is a checkpoint whose DCP metadata (the commit marker) exists."""
        return (path / _DCP / _META).is_file()

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.glob(f"{_PREFIX}*") if p.is_dir() and self.is_complete(p)]
        return sorted(done, key=lambda p: int(p.name[len(_PREFIX) :]))

    def _pointer(self, name: str) -> Path | None:
        f = self.root / name
        if not f.is_file():
            return None
        target = self.root / f.read_text(encoding="utf-8").strip()
        return target if self.is_complete(target) else None

    def latest(self) -> Path | None:
        """The newest complete checkpoint (the pointer, else the highest complete step), or None."""
        found = self._pointer("latest")
        if found is not None:
            return found
        done = self.list()
        return done[-1] if done else None

    def best(self) -> Path | None:
        """The checkpoint marked best by validation, or None."""
        return self._pointer("best")

    # -- state dicts ----------------------------------------------------------------------------
    @staticmethod
    def _options(full: bool = False) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # Frozen parameters (LoRA's base) are neither saved nor expected back: strict=False. A trainable
        # tensor missing from the checkpoint still fails, in dcp.load.
        return StateDictOptions(
            ignore_frozen_params=True, full_state_dict=full, cpu_offload=full, strict=False
        )

    def _state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if optimizer is None:
            return {"model": get_model_state_dict(model, options=self._options())}
        msd, osd = get_state_dict(model, optimizer, options=self._options())
        return {"model": msd, "optim": osd}

    # -- saving -----------------------------------------------------------------------------------
    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        state: Any,
        scheduler: dict[str, Any] | None = None,
        rng: dict[str, Tensor] | None = None,
        is_best: bool = False,
    ) -> Path:
        """Write one checkpoint from every rank (a collective: all ranks must call it).

        Args:
            model: the wrapped (DDP/FSDP2) or plain model.
            optimizer: its optimizer, or None.
            state: a :class:`embedtune.training.checkpoint.TrainState` (dataclass) — same on all ranks.
            scheduler: the LR scheduler's ``state_dict()``.
            rng: this rank's RNG states (default: captured now).
            is_best: also point ``best`` at this checkpoint.

        Returns:
            The checkpoint folder.

        Raises:
            EmbedtuneError: (``CheckpointError``) a file could not be written; earlier checkpoints stay.
        """
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import save as st_save

        from embedtune.training.checkpoint.manager import CheckpointError, capture_rng_state

        ctx = self.ctx
        name = f"{_PREFIX}{state.step:08d}"
        folder = self.root / name
        try:
            if ctx.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                if folder.exists():  # an interrupted save of this step, or a re-save: start clean
                    shutil.rmtree(folder)
                folder.mkdir()
            _barrier()
            r = ctx.rank
            state_dict = asdict(state)
            position = {
                "rank": r,
                "world_size": ctx.world_size,
                "epoch": state_dict.get("epoch"),
                "step_in_epoch": state_dict.get("step_in_epoch"),
                "step": state.step,
            }
            _write_bytes(folder / f"rank_{r:05d}.json", json.dumps(position).encode())
            _write_bytes(folder / f"rank_{r:05d}.safetensors", st_save(rng or capture_rng_state()))
            if ctx.is_main:
                meta = {"world_size": ctx.world_size, "strategy": self.strategy}
                _write_bytes(folder / "distributed.json", json.dumps(meta).encode())
                _write_bytes(folder / "scheduler.json", json.dumps(scheduler or {}).encode())
                _write_bytes(folder / "trainer_state.json", json.dumps(state_dict, indent=1).encode())
            # Last: DCP writes .metadata only after every rank's shards are written (the commit marker).
            with _single_process_quiet():
                dcp.save(
                    self._state(model, optimizer),
                    checkpoint_id=str(folder / _DCP),
                    no_dist=not dist.is_initialized(),
                )
        except OSError as exc:
            previous = self.latest()
            raise CheckpointError(
                f"rank {ctx.rank}: could not save checkpoint {folder} ({exc.strerror or exc}); "
                f"{'the previous checkpoint ' + str(previous) + ' is intact' if previous else 'no earlier checkpoint'}. "
                "Free space (or lower checkpoint.keep_last) and resume with checkpoint.resume=latest."
            ) from exc
        _barrier()
        if ctx.is_main:
            self._set_pointer("latest", name)
            if is_best:
                self._set_pointer("best", name)
            self._rotate()
        _barrier()
        return folder

    def _set_pointer(self, name: str, target: str) -> None:
        _write_bytes(self.root / name, target.encode())

    def _rotate(self) -> None:
        done = self.list()
        keep = set(done[-self.keep_last :])
        keep.update(p for p in (self.latest(), self.best()) if p is not None)
        newest = int(done[-1].name[len(_PREFIX) :]) if done else -1
        for p in self.root.glob(f"{_PREFIX}*"):
            if not p.is_dir() or p in keep:
                continue
            # Old complete checkpoints, and folders of interrupted saves older than the newest one.
            if self.is_complete(p) or int(p.name[len(_PREFIX) :]) < newest:
                shutil.rmtree(p, ignore_errors=True)

    # -- loading ----------------------------------------------------------------------------------
    def resolve(self, resume: str) -> Path:
        """``latest``, ``best`` or a folder → a complete checkpoint.

        Raises:
            EmbedtuneError: (``CheckpointError``) nothing complete to resume from.
        """
        from embedtune.training.checkpoint.manager import CheckpointError

        if resume in ("latest", "best"):
            found = self.latest() if resume == "latest" else self.best()
            if found is None:
                raise CheckpointError(
                    f"checkpoint.resume={resume}: no complete distributed checkpoint (with dcp/.metadata) "
                    f"in {self.root}"
                )
            return found
        path = Path(resume)
        if not self.is_complete(path):
            raise CheckpointError(
                f"checkpoint.resume={resume}: not a complete distributed checkpoint (no {_DCP}/{_META}; "
                "the save was interrupted — resume from an earlier one)"
            )
        return path

    def load(
        self,
        path: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        allow_world_change: bool = False,
    ) -> tuple[Any, dict[str, Any]]:
        """Restore model, optimizer and this rank's RNG in place (a collective: all ranks call it).

        Args:
            path: a complete checkpoint folder.
            model: the wrapped or plain model.
            optimizer: its optimizer, or None (weights only).
            allow_world_change: accept a checkpoint written by a different number of ranks. DCP reshards
                weights and optimizer state, and the data position is global, so training continues on
                the same examples; but per-rank RNG streams (dropout) cannot be carried over, so each rank
                is reseeded from (step, rank) and the run is no longer bitwise identical.

        Returns:
            ``(TrainState, scheduler_state)``; load the latter into the LR scheduler.

        Raises:
            EmbedtuneError: (``CheckpointError``) the checkpoint was written by a different number of
                ranks (and ``allow_world_change`` is off), or cannot be read.
        """
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import load as st_load
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        from embedtune.training.checkpoint.manager import CheckpointError, TrainState, restore_rng_state

        p = Path(path)
        ctx = self.ctx
        try:
            meta = json.loads((p / "distributed.json").read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{p}: not a distributed checkpoint ({exc})") from exc
        same_world = meta["world_size"] == ctx.world_size
        if not same_world and not allow_world_change:
            raise CheckpointError(
                f"{p} was written by {meta['world_size']} ranks but this job has {ctx.world_size}; exact "
                f"resume needs the same number: relaunch with --nproc-per-node × --nnodes = {meta['world_size']}, "
                "or set distributed.resume_on_other_world_size: true to continue (not bitwise exact)"
            )
        sd = self._state(model, optimizer)
        try:
            with _single_process_quiet():
                dcp.load(sd, checkpoint_id=str(p / _DCP), no_dist=not dist.is_initialized())
            rng = st_load((p / f"rank_{ctx.rank:05d}.safetensors").read_bytes()) if same_world else None
            state = TrainState(**json.loads((p / "trainer_state.json").read_text()))
            scheduler = json.loads((p / "scheduler.json").read_text())
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{p}: cannot read checkpoint on rank {ctx.rank}: {exc}") from exc
        if optimizer is None:
            set_model_state_dict(model, sd["model"], options=self._options())
        else:
            set_state_dict(
                model,
                optimizer,
                model_state_dict=sd["model"],
                optim_state_dict=sd["optim"],
                options=self._options(),
            )
        if rng is not None:
            restore_rng_state(rng)
        else:
            # A new, reproducible stream per rank: the old ranks' streams do not map onto the new ranks.
            torch.manual_seed(1_000_003 * (state.step + 1) + ctx.rank)
            if ctx.is_main:
                print(
                    f"warning: resumed {p} ({meta['world_size']} ranks) on {ctx.world_size} ranks: weights, "
                    "optimizer, schedule and data position restored; random streams reseeded, so the run is "
                    "not bitwise identical to an uninterrupted one",
                    flush=True,
                )
        return state, scheduler
