"""One checkpointer for one process and for N ranks: DCP-streamed state, a commit marker, exact resume.

See the package docstring for the layout and guarantees. Model and optimizer state go through
``torch.distributed.checkpoint`` (DCP) in both cases (one process is simply DCP without a process group),
so a single-process run and a ``torchrun`` run write and read the same checkpoints, and FSDP2 shards are
written by the rank that holds them. DCP's file writer streams: each tensor is serialised straight into
its file (a view is copied alone first, a GPU tensor is staged to the host a few MB ahead), never the
whole state in memory.

DCP's own reader unpickles its ``.metadata`` file and loads non-tensor values (e.g. the optimizer's
``lr``) with ``torch.load(weights_only=False)``. A checkpoint folder is data a user may copy from
elsewhere, so both are replaced here: the metadata is read with an unpickler that only constructs DCP's
own metadata classes, and values with ``torch.load(weights_only=True)``. Everything else in a
checkpoint is JSON or safetensors.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from embedtune.training.checkpoint.fingerprint import Fingerprint
from embedtune.training.checkpoint.folder import (
    FORMAT,
    MARKER,
    CheckpointError,
    CheckpointFolder,
    CheckpointWarning,
    file_entry,
    step_name,
    write_json_atomic,
)
from embedtune.training.checkpoint.rng import capture_rng_state, restore_rng_state

__all__ = ["Checkpointer", "Stateful", "TrainState"]

_STATE = "state"  # the DCP sub-folder (model + optimizer)


@dataclass
class TrainState:
    """Where training stands; enough to continue as if never interrupted."""

    step: int = 0
    """Optimizer steps completed."""
    epoch: int = 0
    """Current epoch (0-based)."""
    step_in_epoch: int = 0
    """Optimizer steps completed within the current epoch (the data position)."""
    examples_seen: int = 0
    """Training examples consumed so far."""
    elapsed_s: float = 0.0
    """Training wall time so far (for time budgets across restarts)."""
    best_metric: float | None = None
    """Best validation metric so far (None before the first validation)."""
    best_step: int | None = None
    """Step at which ``best_metric`` was reached."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form JSON-serialisable values (e.g. ``validator``: the validator's ``state_dict()``)."""


class Stateful(Protocol):
    """Anything with a JSON-serialisable ``state_dict()`` and its ``load_state_dict`` (LR schedulers)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


# --------------------------------------------------------------------------------------------------
# DCP without pickle of arbitrary objects
# --------------------------------------------------------------------------------------------------
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP's metadata dataclasses, torch sizes/dtypes/layouts and paths."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES and (name[0].isupper() or name in ("_StorageInfo", "_MEM_FORMAT_ENCODING")):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):
            return super().find_class(module, name)
        if module == "pathlib" and name in (
            "Path",
            "PosixPath",
            "WindowsPath",
            "PurePosixPath",
            "PureWindowsPath",
        ):
            return super().find_class(module, name)
        if (module, name) == ("collections", "OrderedDict"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint's DCP metadata")


def _safe_reader(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            meta_path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(meta_path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(path))


def _safe_load_planner() -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._nested_dict import set_element

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        """DCP's planner, loading non-tensor values (``lr``, ``betas``) with ``weights_only=True``."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return WeightsOnlyLoadPlanner()


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    # DCP warns on every single-process save/load that it "assumes" one process: that is the intent.
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


def _first_failure(exc: BaseException) -> BaseException:
    """The exception inside DCP's ``CheckpointException`` (of the lowest failing rank), else ``exc``."""
    failures = getattr(exc, "failures", None)
    if isinstance(exc, CheckpointException) and failures:
        inner = failures[min(failures)]
        return inner[0] if isinstance(inner, tuple) else inner
    return exc


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _gather_to_all(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)  # plain lists/dicts/str of our own making, between our own ranks
    return out


def _state_dict_options(full: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen parameters (LoRA's base) are neither saved nor expected back: they come from the model's
    # source. strict=False for that reason only; a trainable tensor missing from the checkpoint still
    # fails, in dcp.load.
    return StateDictOptions(ignore_frozen_params=True, full_state_dict=full, cpu_offload=full, strict=False)


def _as_plain(obj: Any) -> Any:
    """JSON-ready copy of a scheduler/validator state (tensors become lists)."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _as_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_as_plain(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------
# The checkpointer
# --------------------------------------------------------------------------------------------------
class Checkpointer:
    """Save and restore a training run; the same calls on one process and on every rank of a job.

    ``save`` and ``load`` are collectives under ``torchrun`` (every rank calls them, in the same order);
    discovery (``list``/``latest``/``best``) reads only the disk.

    Args:
        root: the checkpoint folder.
        keep_last: newest checkpoints to keep (the best one is kept as well).
        rank: this process's rank (default: from the process group, else 0).
        world_size: number of ranks (default: from the process group, else 1).
        strategy: how the model is parallelised (``single``, ``ddp``, ``fsdp2``), recorded in the marker.
        checksums: record a CRC-32 of every file on save and check it on resume (one extra read of the
            checkpoint each way, split over the ranks; sizes are always checked).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        keep_last: int = 2,
        rank: int | None = None,
        world_size: int | None = None,
        strategy: str = "single",
        checksums: bool = True,
    ) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        initialised = dist.is_available() and dist.is_initialized()
        self.folder = CheckpointFolder(root)
        self.keep_last = keep_last
        self.rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
        self.world_size = (
            world_size if world_size is not None else (dist.get_world_size() if initialised else 1)
        )
        self.strategy = strategy
        self.checksums = checksums
        self._verified: set[Path] = set()

    @property
    def root(self) -> Path:
        """The checkpoint folder."""
        return self.folder.root

    # -- discovery ---------------------------------------------------------------------------------
    def list(self) -> list[Path]:
        """Committed checkpoints, oldest first (whether written by one process or by N ranks)."""
        return self.folder.list()

    def latest(self) -> Path | None:
        """The newest committed checkpoint, or None (not verified: see :meth:`resolve`)."""
        done = self.folder.list()
        return done[-1] if done else None

    def best(self) -> Path | None:
        """The checkpoint marked best by validation, or None."""
        return self.folder.pointer("best")

    def info(self, path: str | Path) -> dict[str, Any]:
        """The marker of checkpoint ``path``: step, world size, train state, fingerprint, files."""
        return self.folder.read_marker(Path(path))

    def problems(self, path: str | Path) -> list[str]:
        """Missing, truncated or corrupt files of checkpoint ``path`` (empty when it is intact).

        A collective under ``torchrun``: each rank checksums a share of the files.
        """
        share = (self.rank, self.world_size) if dist.is_initialized() else (0, 1)
        mine = self.folder.problems(Path(path), checksums=self.checksums, share=share)
        found: list[str] = []
        for part in _gather_to_all(mine):
            found.extend(p for p in part if p not in found)
        if not found:
            self._verified.add(Path(path).resolve())
        return found

    def resolve(self, resume: str) -> Path | None:
        """Turn ``checkpoint.resume`` into a verified checkpoint folder.

        ``latest``: the newest intact checkpoint; a damaged newer one (missing, truncated or corrupt
        file) is skipped with a :class:`CheckpointWarning` naming the file. ``auto``: the same, or None
        when the folder holds no checkpoint at all (start fresh). ``best``: the best checkpoint. Anything
        else: that checkpoint folder. A collective under ``torchrun``.

        Raises:
            CheckpointError: nothing intact to resume from, or the named checkpoint is damaged (the
                message names the file and the fix).
        """
        if resume in ("latest", "auto"):
            candidates = self.list()
            if not candidates:
                if resume == "auto":
                    return None
                legacy = self.folder.legacy()
                hint = (
                    f"; {len(legacy)} folder(s) there ({legacy[-1].name}, ...) were written by an earlier "
                    "embedtune version, which this one cannot resume"
                    if legacy
                    else ""
                )
                raise CheckpointError(f"checkpoint.resume={resume}: no checkpoint in {self.root}{hint}")
            skipped: list[str] = []
            for path in reversed(candidates):
                bad = self.problems(path)
                if not bad:
                    if skipped:
                        self._warn(
                            f"checkpoint.resume={resume}: skipped {len(skipped)} damaged checkpoint(s) — "
                            + "; ".join(skipped)
                            + f" — resuming from {path.name}, the newest intact one"
                        )
                    return path
                skipped.append(
                    f"{path.name}: {bad[0]}" + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else "")
                )
            raise CheckpointError(
                f"checkpoint.resume={resume}: every checkpoint in {self.root} is damaged — "
                + "; ".join(skipped)
                + ". Start fresh (checkpoint.resume=null, another output_dir) or restore the files"
            )
        if resume == "best":
            path = self.best()
            if path is None:
                raise CheckpointError(
                    f"checkpoint.resume=best: no best checkpoint in {self.root} (validation off?)"
                )
        else:
            path = Path(resume)
            if not path.is_dir():
                raise CheckpointError(f"checkpoint.resume={resume}: no such checkpoint folder")
        bad = self.problems(path)
        if bad:
            raise CheckpointError(
                f"checkpoint.resume={resume}: {path} is damaged: {'; '.join(bad)}. Resume from another "
                "checkpoint (checkpoint.resume=latest takes the newest intact one)"
            )
        return path

    def _warn(self, message: str) -> None:
        if self.rank == 0:
            warnings.warn(message, CheckpointWarning, stacklevel=3)
            print(f"warning: {message}", file=sys.stderr, flush=True)

    # -- saving ------------------------------------------------------------------------------------
    def save(
        self,
        state: TrainState,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Stateful | None = None,
        fingerprint: Fingerprint | None = None,
        is_best: bool = False,
    ) -> Path:
        """Write the checkpoint of ``state.step`` (a collective: every rank calls it).

        Args:
            state: where training stands (the same on every rank).
            model: the plain, DDP-wrapped or FSDP2-sharded model; only trainable parameters (and
                buffers) are stored, so a LoRA checkpoint holds the adapter only.
            optimizer: its optimizer, or None.
            scheduler: the LR scheduler (its ``state_dict()`` must be JSON-serialisable).
            fingerprint: the run's recipe and data fingerprint, checked by :meth:`load`.
            is_best: also point ``best`` at this checkpoint.

        Returns:
            The committed checkpoint folder.

        Raises:
            CheckpointError: a file could not be written (disk full, permissions); every earlier
                checkpoint is intact.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        train_state = _as_plain(asdict(state))
        sched_state = _as_plain(scheduler.state_dict()) if scheduler is not None else None
        try:
            json.dumps([train_state, sched_state])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint of step {state.step}: the train state or LR scheduler state is not JSON data ({exc})"
            ) from exc
        staging = self.folder.staging(state.step)
        try:
            if self.rank == 0:
                self.folder.stage(state.step)
            _barrier()
            # Each rank's RNG streams (dropout, sampling) in a file of its own.
            rank_file = staging / f"rank_{self.rank:05d}.safetensors"
            meta = {"rank": str(self.rank), "world_size": str(self.world_size)}
            st_save_file(capture_rng_state(), str(rank_file), metadata=meta)
            with open(rank_file, "rb+") as f:
                os.fsync(f.fileno())
            # Model + optimizer: each rank streams its own tensors (its shards under FSDP2).
            writer = FileSystemWriter(str(staging / _STATE), single_file_per_rank=True, sync_files=True)
            with _quiet_single_process():
                dcp.save(
                    self._state(model, optimizer), storage_writer=writer, no_dist=not dist.is_initialized()
                )
            mine = {
                f.relative_to(staging).as_posix(): file_entry(f, self.checksums)
                for f in [rank_file, *sorted((staging / _STATE).glob(f"__{self.rank}_*"))]
            }
            files = {k: v for part in _gather_to_all(mine) for k, v in part.items()}
            if self.rank == 0:
                for f in sorted(p for p in staging.rglob("*") if p.is_file()):
                    rel = f.relative_to(staging).as_posix()
                    if rel not in files:  # DCP's .metadata (and anything else it wrote): on rank 0
                        files[rel] = file_entry(f, self.checksums)
                marker = {
                    "format": FORMAT,
                    "step": state.step,
                    "world_size": self.world_size,
                    "strategy": self.strategy,
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "train_state": train_state,
                    "scheduler": sched_state,
                    "fingerprint": fingerprint.to_json() if fingerprint is not None else None,
                    "files": files,
                }
                write_json_atomic(staging / MARKER, marker)  # the commit: from here on it is complete
                final = self.folder.publish(state.step)
                self.folder.set_pointer("latest", final)
                if is_best:
                    self.folder.set_pointer("best", final)
                best = self.best()
                self.folder.rotate(self.keep_last, {final} | ({best} if best else set()))
        except (OSError, CheckpointException) as exc:
            cause = _first_failure(exc)
            if self.rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
            previous = self.latest()
            kept = (
                f"the previous checkpoint {previous} is intact"
                if previous
                else "no earlier checkpoint exists"
            )
            why = (
                cause.strerror if isinstance(cause, OSError) else None
            ) or f"{type(cause).__name__}: {cause}"
            raise CheckpointError(
                f"rank {self.rank}: could not save the checkpoint of step {state.step} in {self.root} ({why}); "
                f"{kept}. Free space (or lower checkpoint.keep_last) and resume with checkpoint.resume=latest."
            ) from cause
        _barrier()
        return self.root / step_name(state.step)

    def _state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if optimizer is None:
            return {"model": get_model_state_dict(model, options=_state_dict_options())}
        msd, osd = get_state_dict(model, optimizer, options=_state_dict_options())
        return {"model": msd, "optim": osd}

    # -- loading -----------------------------------------------------------------------------------
    def load(
        self,
        path: str | Path,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Stateful | None = None,
        fingerprint: Fingerprint | None = None,
        allow_config_change: bool = False,
        allow_world_change: bool = False,
        restore_rng: bool = True,
    ) -> TrainState:
        """Restore a checkpoint into ``model``/``optimizer``/``scheduler`` and this rank's RNG, in place
        (a collective under ``torchrun``).

        Args:
            path: a checkpoint folder (from :meth:`resolve`; verified here if it was not).
            model: the model, wrapped/sharded the same way as when training.
            optimizer: its optimizer, or None (weights only).
            scheduler: the LR scheduler, or None.
            fingerprint: this run's fingerprint; when both it and the checkpoint's are known, any
                difference is refused (unless ``allow_config_change``).
            allow_config_change: resume although the recipe or data changed (each change is printed).
            allow_world_change: resume a checkpoint written by another number of ranks. DCP reshards
                weights and optimizer state and the data position is global, so training continues on
                the same examples; per-rank RNG streams cannot carry over (each rank is reseeded from
                ``(step, rank)``), so the run is no longer bitwise the uninterrupted one.
            restore_rng: restore this rank's RNG streams.

        Returns:
            The :class:`TrainState` the checkpoint was saved at.

        Raises:
            CheckpointError: the checkpoint is damaged, was written with another recipe, data or
                number of ranks, or does not fit this model; the message names what and how to proceed.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        p = Path(path)
        if p.resolve() not in self._verified:
            bad = self.problems(p)
            if bad:
                raise CheckpointError(f"{p} is damaged: {'; '.join(bad)}; resume from another checkpoint")
        marker = self.folder.read_marker(p)
        self._check_fingerprint(p, marker, fingerprint, allow_config_change)
        saved_world = int(marker["world_size"])
        same_world = saved_world == self.world_size
        if not same_world and not allow_world_change:
            raise CheckpointError(
                f"{p} was written by {saved_world} rank(s) but this run has {self.world_size}; an exact resume "
                f"needs the same number: relaunch with --nproc-per-node × --nnodes = {saved_world}, or set "
                "distributed.resume_on_other_world_size: true to continue (weights, optimizer and data position "
                "carry over; random streams are reseeded, so the run is not bitwise identical)"
            )
        sd = self._state(model, optimizer)
        self._check_keys(p, sd)  # before DCP, so a mismatch is one clear message (DCP logs tracebacks)
        try:
            with _quiet_single_process():
                dcp.load(
                    sd,
                    storage_reader=_safe_reader(p / _STATE),
                    planner=_safe_load_planner(),
                    no_dist=not dist.is_initialized(),
                )
        except (Exception, CheckpointException) as exc:  # DCP wraps per-rank failures (a BaseException)
            cause = _first_failure(exc)
            raise CheckpointError(
                f"{p}: cannot restore it on rank {self.rank} ({type(cause).__name__}: {str(cause)[:300]})"
            ) from cause
        if optimizer is None:
            set_model_state_dict(model, sd["model"], options=_state_dict_options())
        else:
            set_state_dict(
                model,
                optimizer,
                model_state_dict=sd["model"],
                optim_state_dict=sd["optim"],
                options=_state_dict_options(),
            )
        if scheduler is not None and marker.get("scheduler") is not None:
            scheduler.load_state_dict(marker["scheduler"])
        state = TrainState(**marker["train_state"])
        if restore_rng:
            if same_world:
                rank_file = p / f"rank_{self.rank:05d}.safetensors"
                try:
                    restore_rng_state(st_load_file(str(rank_file)))
                except (OSError, SafetensorError, KeyError, ValueError) as exc:
                    raise CheckpointError(f"{rank_file}: unreadable RNG state ({exc})") from exc
            else:
                # A new, reproducible stream per rank: the old ranks' streams do not map onto the new ranks.
                torch.manual_seed(1_000_003 * (state.step + 1) + self.rank)
                self._warn(
                    f"resumed {p} ({saved_world} ranks) on {self.world_size}: weights, optimizer, schedule and "
                    "data position restored; random streams reseeded, so the run is not bitwise identical to an "
                    "uninterrupted one"
                )
        return state

    def load_model(self, path: str | Path, model: nn.Module) -> TrainState:
        """Restore only the weights of checkpoint ``path`` (e.g. the best one at the end of training);
        any number of ranks may read it."""
        return self.load(
            path, model=model, allow_config_change=True, allow_world_change=True, restore_rng=False
        )

    @staticmethod
    def _check_keys(path: Path, sd: dict[str, Any]) -> None:
        """Check that the checkpoint holds every tensor ``sd`` expects, before DCP reads anything (a
        mismatch is then one clear message; DCP would log a traceback per rank).

        A parameter that never had a gradient (e.g. BERT's unused pooler) has no optimizer state in the
        checkpoint, while ``get_state_dict`` creates zero state for every parameter of a fresh optimizer:
        such entries are dropped from ``sd``, so the optimizer comes back exactly as it was saved.
        """
        from torch.distributed.checkpoint._nested_dict import flatten_state_dict

        meta_file = path / _STATE / ".metadata"
        try:
            with open(meta_file, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            saved = set(metadata.state_dict_metadata)
        except (OSError, pickle.UnpicklingError, AttributeError, EOFError, ValueError) as exc:
            raise CheckpointError(f"{meta_file}: unreadable checkpoint index ({exc})") from None
        optim_state = sd.get("optim", {}).get("state", {})
        for fqn in list(optim_state):
            if not any(f"optim.state.{fqn}.{k}" in saved for k in optim_state[fqn]):
                del optim_state[fqn]  # no state when saved: the parameter had not been stepped yet
        wanted, _ = flatten_state_dict(sd)
        missing = sorted(k for k in wanted if k not in saved)
        if missing:
            kinds = "model weights" if any(k.startswith("model.") for k in missing) else "optimizer state"
            raise CheckpointError(
                f"{path}: the checkpoint lacks {len(missing)} {kinds} this run trains (e.g. "
                f"{', '.join(m.split('.', 1)[1] for m in missing[:3])}); it was written for another model or "
                "LoRA setting: resume with the recipe that wrote it"
            )

    def _check_fingerprint(
        self, path: Path, marker: dict[str, Any], fingerprint: Fingerprint | None, allow: bool
    ) -> None:
        saved = marker.get("fingerprint")
        if fingerprint is None or saved is None:
            return
        changes = fingerprint.changes(Fingerprint.from_json(saved))
        if not changes:
            return
        listing = "; ".join(changes[:8]) + (f"; ... ({len(changes) - 8} more)" if len(changes) > 8 else "")
        if allow:
            self._warn(f"resuming {path.name} although the recipe or data changed (allowed): {listing}")
            return
        raise CheckpointError(
            f"{path} was written by a different run — changed since: {listing}. Resume with the recipe and data "
            "that wrote it, start fresh in another output_dir, or set checkpoint.allow_config_change: true to "
            "continue with the changes"
        )
