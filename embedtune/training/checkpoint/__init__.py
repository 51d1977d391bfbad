"""Training checkpoints: one checkpointer for one process and for N ranks (``torchrun``).

Layout of a checkpoint folder (``checkpoint.dir``, default ``<output_dir>/checkpoints``)::

    <root>/
      step_00000040/
        state/                    model (LoRA: adapter only) + optimizer, by torch.distributed.checkpoint:
          __0_0.distcp ...        each rank streams its own tensors (its shards under FSDP2)
          .metadata               DCP's index (read back without unpickling arbitrary objects)
        rank_00000.safetensors    rank 0's RNG streams: python, numpy, torch CPU and CUDA (one per rank)
        checkpoint.json           the commit marker, written last: step, world size, train state (epoch,
                                  data position, best metric, validator state), LR scheduler state,
                                  fingerprint of recipe and data, and every file's size and CRC-32
      latest                      the newest committed checkpoint (for people and tools)
      best                        the best checkpoint by validation

One process writes exactly this with ``world_size: 1``, so single-process and ``torchrun`` runs share
checkpoints, rotation and resume. Guarantees:

* **Streaming.** Tensors are written one at a time from where they live; the state is never assembled
  in memory (``benchmarks/checkpoint_memory.py`` measures it).
* **Atomic.** A checkpoint is staged in ``.tmp-step_N``; the marker commits it; a re-save of a step renames
  the old one aside, the new one in, then deletes the old (:mod:`.folder`). A crash anywhere leaves a
  complete checkpoint to resume from.
* **Verified.** Resuming checks every file's size and checksum; ``resume: latest``/``auto`` skips a
  damaged checkpoint with a warning naming the file and takes the newest intact one.
* **Same run.** Resuming with another recipe or other data is refused, naming each change
  (:mod:`.fingerprint` lists what may change); ``checkpoint.allow_config_change: true`` overrides. A
  different number of ranks is refused unless ``distributed.resume_on_other_world_size: true`` (DCP
  reshards; RNG streams are reseeded).
* **Safe.** JSON, safetensors and tensors loaded with ``weights_only=True``; no arbitrary pickle.

:func:`save_consolidated` writes the final model as one plain folder (transformers layout).
"""

from embedtune.training.checkpoint.checkpointer import Checkpointer, Stateful, TrainState
from embedtune.training.checkpoint.consolidate import save_consolidated
from embedtune.training.checkpoint.fingerprint import MAY_CHANGE_ON_RESUME, Fingerprint, data_paths
from embedtune.training.checkpoint.folder import CheckpointError, CheckpointWarning
from embedtune.training.checkpoint.rng import capture_rng_state, restore_rng_state

__all__ = [
    "MAY_CHANGE_ON_RESUME",
    "CheckpointError",
    "CheckpointWarning",
    "Checkpointer",
    "Fingerprint",
    "Stateful",
    "TrainState",
    "capture_rng_state",
    "data_paths",
    "restore_rng_state",
    "save_consolidated",
]
