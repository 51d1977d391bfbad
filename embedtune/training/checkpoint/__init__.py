"""Training checkpoints: save, find, verify and restore everything a run needs to continue exactly.

Being rebuilt into one checkpointer for one process and N ranks (issue #11); until then this package
holds the two systems it replaces: :class:`CheckpointManager` (single process) and
:class:`DistributedCheckpointer` (``torchrun``, moved here from ``training/distributed.py``), plus
:func:`save_consolidated` (the final model as one plain folder).
"""

from embedtune.training.checkpoint.consolidate import save_consolidated
from embedtune.training.checkpoint.legacy_dcp import DistributedCheckpointer
from embedtune.training.checkpoint.manager import (
    Checkpoint,
    CheckpointError,
    CheckpointManager,
    TrainState,
    capture_rng_state,
    restore_rng_state,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointManager",
    "DistributedCheckpointer",
    "TrainState",
    "capture_rng_state",
    "restore_rng_state",
    "save_consolidated",
]
