"""``TrainConfig``: the typed form of a training recipe (``embedtune train recipe.yaml``).

A recipe is YAML whose top-level blocks are the fields below; see ``embedtune/recipes/*.yaml`` for
complete examples and ``docs/training.md`` for a walk-through. Load one with
:func:`load_train_config`, which checks every key, type and value before anything heavy is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from embedtune.config import LOSSES, OPTIMIZERS, POOLING, SCHEDULERS, load_config
from embedtune.data.config import DataConfig
from embedtune.errors import ConfigError
from embedtune.eval.config import ValidationConfig

# Nothing here imports torch: `embedtune train/validate` check a recipe in well under a second. The
# blocks of the loss, optimizer and distributed modules are defined here and re-exported there.
Strategy = Literal["ddp", "fsdp2"]

__all__ = [
    "CheckpointConfig",
    "CrossEncoderConfig",
    "DistillConfig",
    "DistributedConfig",
    "GradCacheConfig",
    "LRSchedulerConfig",
    "LoggingConfig",
    "LossConfig",
    "MiningConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PeftConfig",
    "StepSchedulerConfig",
    "TrainConfig",
    "check_master_weights",
    "load_train_config",
]


@dataclass
class LossConfig:
    """The recipe's ``loss:`` block."""

    name: str = "infonce"
    """Loss to use, by registered name. Available: ``infonce``."""

    temperature: float = 0.02
    """Softmax temperature τ; logits are ``cos / τ`` (sentence-transformers' ``scale = 1 / τ``, so the
    default 0.02 equals scale 50). Lower is sharper."""

    in_batch_negatives: bool = True
    """Also score every query against the other queries' passages (positives and hard negatives) in the
    batch. NeMo's default is off; on is almost always better for small batches."""

    mask_false_negatives: bool = True
    """Never count a passage as a negative when it has the same document ID (or identical token
    sequence) as the query's positive or as any other of its positives, e.g. two queries in one batch
    sharing a relevant document."""

    matryoshka_dims: list[int] | None = None
    """Also train truncated embeddings: the loss is averaged over these leading-dimension prefixes
    (e.g. ``[768, 256, 64]``), each re-normalised. ``null`` trains the full embedding only."""

    matryoshka_weights: list[float] | None = None
    """Weight of each Matryoshka dimension in the average (default: all equal)."""

    def __post_init__(self) -> None:
        LOSSES.check(self.name, "name")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: must be > 0 (typical 0.01-0.1), got {self.temperature}")
        if self.matryoshka_dims is not None:
            if not self.matryoshka_dims or any(d <= 0 for d in self.matryoshka_dims):
                raise ConfigError(f"matryoshka_dims: must be positive sizes, got {self.matryoshka_dims}")
            if self.matryoshka_weights is not None and len(self.matryoshka_weights) != len(
                self.matryoshka_dims
            ):
                raise ConfigError(
                    "matryoshka_weights: needs one weight per entry of matryoshka_dims "
                    f"({len(self.matryoshka_dims)}), got {len(self.matryoshka_weights)}"
                )
        elif self.matryoshka_weights is not None:
            raise ConfigError("matryoshka_weights: set matryoshka_dims too, or remove the weights")


@dataclass
class OptimizerConfig:
    """The recipe's ``optimizer:`` block."""

    name: str = "adamw"
    """Optimizer by registered name: ``adamw`` or ``sgd``."""
    lr: float = 2e-5
    """Peak learning rate (reached at the end of warmup)."""
    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW); not applied to biases and norm weights."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam moment decay rates."""
    eps: float = 1e-8
    """Adam epsilon."""
    momentum: float = 0.0
    """SGD momentum (ignored by AdamW)."""

    def __post_init__(self) -> None:
        OPTIMIZERS.check(self.name, "name")
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas: each must be in [0, 1), got {list(self.betas)}")


@dataclass
class LRSchedulerConfig:
    """The recipe's ``lr_scheduler:`` block."""

    name: str = "linear"
    """Decay after warmup: ``constant``, ``linear`` (to ``min_lr_ratio``) or ``cosine``."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to ``optimizer.lr``."""
    warmup_ratio: float | None = None
    """Warmup as a fraction of the total steps (overrides ``warmup_steps`` when set)."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak."""
    warmup_start_ratio: float = 0.0
    """Where warmup starts, as a fraction of the peak (NeMo AutoModel starts at 0.1: ``init_lr``)."""

    def __post_init__(self) -> None:
        SCHEDULERS.check(self.name, "name")
        if not 0 <= self.warmup_start_ratio <= 1:
            raise ConfigError(f"warmup_start_ratio: must be in [0, 1], got {self.warmup_start_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class DistributedConfig:
    """The recipe's ``distributed:`` block (used only when the job runs on more than one process)."""

    strategy: Strategy = "ddp"
    """``ddp``: every rank holds the whole model and optimizer state, gradients are all-reduced; the
    fastest choice whenever the model, its gradients and the optimizer state fit one device (always the
    case with LoRA). ``fsdp2``: parameters, gradients and optimizer state are sharded across ranks
    (``torch.distributed.fsdp.fully_shard``), each block gathered just in time; use it for full
    fine-tuning of large decoders that do not fit one device."""

    cross_device_negatives: bool = True
    """Score every query against the passages of *all* ranks (gathered with gradients), so the
    in-batch negatives are those of the global (micro-)batch, as in a single process. Off: each rank
    uses only its own passages (less communication, fewer negatives)."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend; ``auto`` is NCCL when training on CUDA, gloo otherwise."""

    timeout_minutes: float = 10.0
    """How long a collective may wait for the other ranks before the job fails. Bounds the hang when
    one rank dies; raise it if checkpoints or validation on rank 0 take longer."""

    reshard_after_forward: bool = True
    """FSDP2 only: free each block's gathered parameters after its forward and re-gather them for the
    backward (least memory). False keeps them until the backward (more memory, one all-gather less)."""

    resume_on_other_world_size: bool = False
    """Allow ``checkpoint.resume`` from a checkpoint written by a different number of ranks (e.g. after
    losing a node). Weights, optimizer state (resharded by DCP), schedule and data position carry over;
    per-rank random streams cannot, so the run continues but is not bitwise identical. Off: refused."""

    def __post_init__(self) -> None:
        if not self.timeout_minutes > 0:
            raise ConfigError(f"timeout_minutes: must be > 0, got {self.timeout_minutes}")


@dataclass
class ModelConfig:
    """The recipe's ``model:`` block: which backbone, and how it becomes an encoder."""

    name_or_path: str = ""
    """A folder, a hub name (offline: must be cached), or a short name such as ``smollm2-135m``,
    ``minilm`` or ``tiny-llama``. Required."""
    pooling: str | None = None
    """``mean`` (``avg``), ``cls``, ``last`` or ``weighted_mean``; null keeps the model's saved/default."""
    normalize: bool | None = None
    """L2-normalise embeddings (cosine similarity); null keeps the model's setting (default true)."""
    query_prefix: str | None = None
    """Text put before each query (e.g. ``"query: "``); per-dataset instructions come from the data."""
    passage_prefix: str | None = None
    """Text put before each passage (e.g. ``"passage: "``)."""
    pool_instruction: bool | None = None
    """Pool the prefix/instruction tokens too; false attends to them but leaves them out of pooling."""
    max_length: int | None = None
    """Default tokens per text saved with the model (training lengths are set in ``data``)."""
    padding_side: Literal["left", "right"] | None = None
    """Padding side; null keeps the model's default."""
    bidirectional: bool | None = None
    """Convert a causal decoder to bidirectional attention (null: yes for decoders); verified at load."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype the weights are *stored* in. Full fine-tuning needs ``float32`` (fp32 master weights; set
    ``bf16: true`` for bfloat16 compute): bf16 keeps 8 mantissa bits, so AdamW updates of ~1e-6 to
    weights of ~0.02 round to nothing. ``bfloat16`` is only for a frozen base under LoRA (``peft:``),
    where it halves memory; LoRA adapters stay float32 either way. bfloat16 without ``peft`` is refused."""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    """Attention kernel. null: transformers' choice (``sdpa``), except that a model training on a CPU
    with dropout on its attention probabilities runs embedtune's blockwise dropout attention
    (:mod:`embedtune.models.attention`; PyTorch's fused CPU kernel has no dropout). ``sdpa``: PyTorch's
    own, its unfused path while that dropout is above 0. ``eager`` trains converted decoders faster than
    ``sdpa`` on CPUs; ``sdpa`` is the GPU choice."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more compute."""
    attention_dropout: float | None = None
    """Dropout on the attention probabilities while training; null keeps the model's own (BERT-family
    encoders: 0.1; Llama, Mistral: 0). 0 lets PyTorch run its fused attention kernel, which has no
    dropout on CPU: training steps measured 1.7-1.9x faster for MiniLM at 256 tokens. Hidden-state dropout
    is unchanged, and the saved config keeps the checkpoint's value."""

    def encoder_kwargs(self) -> dict[str, Any]:
        """The settings ``AutoBiEncoder.from_pretrained`` takes from this block (all but the model name)."""
        return {
            "pooling": self.pooling,
            "normalize": self.normalize,
            "query_prefix": self.query_prefix,
            "passage_prefix": self.passage_prefix,
            "pool_instruction": self.pool_instruction,
            "max_length": self.max_length,
            "padding_side": self.padding_side,
            "dtype": self.dtype,
            "attn_implementation": self.attn_implementation,
            "bidirectional": self.bidirectional,
        }

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ConfigError("name_or_path: required — a model folder, hub name or short name (e.g. minilm)")
        if self.pooling is not None:
            POOLING.check(self.pooling, "pooling")
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(f"max_length: must be >= 1, got {self.max_length}")
        if self.attention_dropout is not None and (
            isinstance(self.attention_dropout, bool) or not 0 <= self.attention_dropout < 1
        ):
            raise ConfigError(f"attention_dropout: must be in [0, 1) or null, got {self.attention_dropout!r}")


@dataclass
class PeftConfig:
    """The recipe's ``peft:`` block: train LoRA adapters instead of all weights (null: full fine-tuning)."""

    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] | None = None
    """Module names to adapt (e.g. ``[q_proj, k_proj, v_proj, o_proj]``); or set ``match_all_linear``."""
    match_all_linear: bool = False
    """Adapt every linear layer of the backbone (PEFT's ``all-linear``)."""
    merge_on_save: bool = True
    """Also write a merged model (``<output_dir>/model``) next to the adapter (``<output_dir>/adapter``)."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"r: must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if bool(self.target_modules) == self.match_all_linear:
            raise ConfigError(
                "target_modules: set either target_modules (e.g. [q_proj, v_proj]) or match_all_linear: true"
            )


@dataclass
class StepSchedulerConfig:
    """The recipe's ``step_scheduler:`` block: batch sizes and how long to train."""

    global_batch_size: int = 32
    """Queries per optimizer step (each with its positive and hard negatives)."""
    local_batch_size: int | None = None
    """Queries per forward/backward pass; ``global_batch_size / local_batch_size`` micro-batches are
    accumulated. In-batch negatives come from the micro-batch (use ``gradcache`` to get them from the
    whole global batch). Null: equal to ``global_batch_size``."""
    num_epochs: int = 1
    """Passes over the training data (a partial last batch of an epoch is dropped)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides ``num_epochs`` for the LR schedule too)."""
    max_time_minutes: float | None = None
    """Wall-time budget of the training loop, validations included: training stops before a step (plus
    a final validation as long as the last one) would overshoot it; a checkpoint and the final model are
    still saved. The LR schedule still follows ``max_steps``/``num_epochs``."""
    ckpt_every_steps: int | None = None
    """Save a resumable checkpoint every this many steps (and at the end); null: only at the end."""
    log_every_steps: int = 1
    """Write a metrics line every this many steps."""

    def __post_init__(self) -> None:
        if self.global_batch_size < 1:
            raise ConfigError(f"global_batch_size: must be >= 1, got {self.global_batch_size}")
        lb = self.local_batch_size
        if lb is not None and (lb < 1 or self.global_batch_size % lb):
            raise ConfigError(
                f"local_batch_size: must divide global_batch_size ({self.global_batch_size}), got {lb}"
            )
        for name in ("num_epochs", "max_steps", "ckpt_every_steps", "log_every_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name}: must be >= 1, got {v}")
        if self.max_time_minutes is not None and self.max_time_minutes <= 0:
            raise ConfigError(f"max_time_minutes: must be > 0, got {self.max_time_minutes}")

    @property
    def micro_batch_size(self) -> int:
        """Queries per forward/backward pass."""
        return self.local_batch_size or self.global_batch_size


@dataclass
class GradCacheConfig:
    """The recipe's ``gradcache:`` block: big contrastive batches in bounded memory."""

    enabled: bool = False
    """Compute the loss over the whole global batch (all of it as in-batch negatives), encoding
    ``chunk_size`` texts at a time; gradients equal the unchunked loss's."""
    chunk_size: int = 32
    """Texts (queries or passages) per forward pass under GradCache."""

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size: must be >= 1, got {self.chunk_size}")


@dataclass
class CheckpointConfig:
    """The recipe's ``checkpoint:`` block."""

    dir: str | None = None
    """Checkpoint folder; null: ``<output_dir>/checkpoints``."""
    keep_last: int = 2
    """Keep this many newest checkpoints (plus the best one by validation)."""
    resume: str | None = None
    """``latest``, ``best`` or a checkpoint folder to continue from; null starts fresh. ``auto`` resumes
    from ``latest`` when one exists."""
    load_best_at_end: bool = True
    """With validation on, save the best checkpoint's weights as the final model."""
    allow_config_change: bool = False
    """Resume although the recipe or its training data changed since the checkpoint was written (each
    change is printed). Off: such a resume is refused, naming what changed. Keys that may change on
    resume without this (``max_steps``, ``num_epochs``, ``max_time_minutes``, logging, ...) are listed
    in ``docs/checkpoints.md``."""

    def __post_init__(self) -> None:
        if self.keep_last < 1:
            raise ConfigError(f"keep_last: must be >= 1, got {self.keep_last}")


@dataclass
class LoggingConfig:
    """The recipe's ``logging:`` block."""

    progress_bar: bool = True
    """Show a progress bar (step, loss, lr, examples/s, ETA) on stderr."""
    tensorboard: bool | None = None
    """Write TensorBoard logs to ``<output_dir>/tensorboard``. Null (the default): when the ``tensorboard``
    package is installed, silently otherwise; true: asked for, so a missing package is reported."""
    plot: bool = True
    """Write ``<output_dir>/loss.png`` at the end (needs matplotlib)."""


@dataclass
class DistillConfig:
    """The ``distill:`` block: add a KL term to a cross-encoder teacher's scores (null: no distillation)."""

    weight: float = 1.0
    """Weight of the KL term added to the contrastive loss."""
    teacher_temperature: float = 1.0
    """τ_t: teacher logits are divided by it before the softmax."""
    student_temperature: float | None = None
    """τ_s: student scores are divided by it; null takes ``loss.temperature``."""
    score_field: str = "ce_score"
    """Field of each ``pos_doc``/``neg_doc`` entry that holds the teacher's score (``embedtune mine
    --reranker`` writes ``ce_score``)."""
    teacher: str | None = None
    """Where teacher scores come from: a mined ``.json``/``.jsonl`` file holding ``score_field`` (usually
    the training data itself), or a reranker folder to score every batch on the fly. null: the first
    training data set's file."""
    teacher_batch_size: int = 64
    """Pairs per teacher forward pass (on-the-fly teacher only)."""

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"weight: must be >= 0, got {self.weight}")
        if not self.teacher_temperature > 0:
            raise ConfigError(f"teacher_temperature: must be > 0, got {self.teacher_temperature}")
        if self.student_temperature is not None and not self.student_temperature > 0:
            raise ConfigError(f"student_temperature: must be > 0, got {self.student_temperature}")


@dataclass
class CrossEncoderConfig:
    """The ``cross_encoder:`` block, read by ``recipe: rerank`` only."""

    template: str | None = None
    """``null``: text-pair input (BERT-style, sentence-transformers compatible); or a prompt such as
    ``"question:{query} \\n \\n passage:{passage}"`` (decoders). ``model.max_length`` (default 256) is
    the tokens per (query, passage) pair and ``data.n_passages`` the group size (1 positive + negatives)."""
    pooling: Literal["avg", "cls", "last"] | None = None
    """``avg``/``cls``/``last``: NeMo AutoModel's cross-encoder head on a Llama backbone (pooled hidden
    states through a bias-free score head); null: transformers' own head."""


@dataclass
class MiningConfig:
    """The ``mining:`` block: re-mine hard negatives with the model being trained (null: never).

    Every ``refresh_every_steps`` steps the training corpus is re-encoded with the current weights and
    each example's negatives are re-mined with the positive-aware margin (see ``embedtune.mining``);
    the epochs that follow sample from them. The mined sets are saved under ``<output_dir>/mined/`` and
    named by the checkpoint, so a resumed run trains on exactly the same negatives.
    """

    refresh_every_steps: int = 100
    """Re-mine after every this many optimizer steps."""
    model: Literal["current"] = "current"
    """Which model mines: ``current`` (the weights being trained). For a fixed teacher, mine once
    offline with ``embedtune mine``."""
    num_negatives: int | None = None
    """Negatives kept per example (null: ``data.n_passages - 1``)."""
    range_start: int = 0
    """First rank of the candidate window (0-based, positives removed)."""
    range_end: int = 100
    """Rank after the last one of the window."""
    margin: float | None = 0.95
    """Drop candidates scoring above this share of the positive (``perc``) or within it (``abs``)."""
    margin_type: Literal["perc", "abs"] = "perc"
    """How ``margin`` applies (``embedtune mine --margin-type``)."""
    sampling: Literal["top", "random"] = "top"
    """Keep the hardest survivors of the window, or a seeded random sample of them."""
    batch_size: int = 64
    """Texts per encoding forward pass."""
    max_length: int | None = None
    """Tokens per text while encoding (null: the model's)."""

    def __post_init__(self) -> None:
        if self.refresh_every_steps < 1:
            raise ConfigError(f"refresh_every_steps: must be >= 1, got {self.refresh_every_steps}")
        if self.num_negatives is not None and self.num_negatives < 1:
            raise ConfigError(f"num_negatives: must be >= 1 or null, got {self.num_negatives}")
        if not 0 <= self.range_start < self.range_end:
            raise ConfigError(
                f"range_start/range_end: need 0 <= start < end, got {self.range_start}:{self.range_end}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")


@dataclass
class TrainConfig:
    """A complete training recipe: a bi-encoder (default), distillation (``distill:``) or a reranker
    (``recipe: rerank``) — one schema, one loop (:mod:`embedtune.training.recipe`)."""

    model: ModelConfig
    """The backbone and how it becomes an encoder."""
    data: DataConfig
    """Training data, prefixes/instructions, lengths, negatives per query."""
    output_dir: str = "runs/embedtune"
    """Where the final model, checkpoints, metrics and plots go."""
    seed: int = 42
    """Seeds python, numpy and torch; with the same seed a run is reproducible bit for bit on one device."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Contrastive loss."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer."""
    lr_scheduler: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    """Warmup and decay."""
    step_scheduler: StepSchedulerConfig = field(default_factory=StepSchedulerConfig)
    """Batch sizes, accumulation and duration."""
    gradcache: GradCacheConfig = field(default_factory=GradCacheConfig)
    """GradCache for large batches."""
    peft: PeftConfig | None = None
    """LoRA adapters; null trains all weights."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""
    validation: ValidationConfig | None = None
    """Retrieval validation every N steps (best checkpoint, early stopping); null: none."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Progress bar, TensorBoard, loss plot."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Multi-process training (``torchrun``): DDP or FSDP2, cross-rank negatives; ignored on one process."""
    bf16: bool = False
    """bfloat16 compute over float32 weights (2-3x faster on CPUs with AMX and on GPUs): autocast on one
    process and under DDP; under FSDP2 a ``MixedPrecisionPolicy(param_dtype=bfloat16,
    reduce_dtype=float32)`` over the fp32 shards. The optimizer always steps the fp32 weights."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this value; null disables clipping."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; ``auto`` picks CUDA when available."""
    num_threads: int | None = None
    """torch CPU threads (null: torch's default)."""
    recipe: Literal["biencoder", "rerank"] = "biencoder"
    """What to train: ``biencoder`` (contrastive; with a ``distill:`` block, distillation from a
    reranker) or ``rerank`` (a cross-encoder, listwise loss over each query's group)."""
    distill: DistillConfig | None = None
    """KL distillation from a cross-encoder's scores (bi-encoder only; null: plain contrastive)."""
    cross_encoder: CrossEncoderConfig = field(default_factory=CrossEncoderConfig)
    """Input template of the cross-encoder (``recipe: rerank`` only)."""
    mining: MiningConfig | None = None
    """Re-mine hard negatives during training with the current model; null: the data's negatives throughout."""
    pipeline: dict[str, Any] | None = None
    """The stages ``embedtune finetune`` runs around training (inputs, mining settings); written by
    ``finetune`` into its recipe and ignored by ``embedtune train``."""

    def __post_init__(self) -> None:
        check_master_weights(self)
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"max_grad_norm: must be > 0 or null, got {self.max_grad_norm}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads: must be >= 1, got {self.num_threads}")
        if self.recipe == "rerank":
            _check_rerank(self)
        elif self.validation is not None and self.validation.retriever:
            raise ConfigError(
                "validation.retriever: only for recipe: rerank (a bi-encoder recipe validates the model it "
                "trains); remove it"
            )
        sched = self.step_scheduler
        if self.gradcache.enabled and sched.local_batch_size not in (None, sched.global_batch_size):
            raise ConfigError(
                "step_scheduler.local_batch_size: with gradcache.enabled the whole global batch is one loss; "
                "remove local_batch_size (gradcache.chunk_size bounds the memory)"
            )
        if self.loss.matryoshka_dims and self.loss.matryoshka_dims != sorted(
            self.loss.matryoshka_dims, reverse=True
        ):
            raise ConfigError(
                f"loss.matryoshka_dims: list sizes from largest to smallest, got {self.loss.matryoshka_dims}"
            )

    @property
    def checkpoint_dir(self) -> Path:
        """The resolved checkpoint folder."""
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.output_dir) / "checkpoints"


def _check_rerank(cfg: TrainConfig) -> None:
    """What ``recipe: rerank`` cannot combine with (each names the key to remove)."""
    refuse = {
        "distill": cfg.distill is not None,
    }
    if cfg.gradcache.enabled:
        raise ConfigError(
            "gradcache: not needed with recipe: rerank — its listwise loss is a mean over queries, each over "
            "its own group, so micro-batches give the whole batch's gradient exactly: remove the gradcache "
            "block and bound memory with step_scheduler.local_batch_size (queries per forward/backward)"
        )
    for key, present in refuse.items():
        if present:
            raise ConfigError(
                f"{key}: not supported with recipe: rerank (a cross-encoder learns from its listwise loss "
                f"over labelled groups); remove the {key} block, or train a bi-encoder (drop recipe: rerank)"
            )
    if cfg.peft is not None and cfg.distributed.strategy == "fsdp2":
        raise ConfigError(
            "peft: a LoRA reranker cannot be merged from FSDP2 shards yet; train it with "
            "distributed.strategy: ddp (LoRA keeps the per-rank memory small), or drop peft under fsdp2"
        )
    if cfg.validation is not None and not cfg.validation.retriever:
        raise ConfigError(
            "validation.retriever: a rerank recipe validates by reranking a retriever's top documents; name "
            "the bi-encoder that retrieves them (e.g. retriever: minilm, or a fine-tuned model folder)"
        )
    if cfg.data.n_passages < 2:
        raise ConfigError(
            f"data.n_passages: recipe: rerank needs a positive and at least one negative per query (>= 2), "
            f"got {cfg.data.n_passages}"
        )


def check_master_weights(cfg: TrainConfig) -> None:
    """Refuse to train weights stored in bfloat16: they need fp32 master copies.

    Pure-bf16 AdamW does not train at fine-tuning learning rates (an update of 5e-6 to a weight of 0.02
    is below half a bf16 ulp, 6e-5, and rounds away). Trained weights stay float32 and ``bf16: true``
    runs the forward/backward in bfloat16 (autocast; FSDP2: ``MixedPrecisionPolicy`` over fp32 shards).

    Raises:
        ConfigError: ``model.dtype: bfloat16`` without a ``peft:`` block.
    """
    if cfg.model.dtype == "bfloat16" and cfg.peft is None:
        raise ConfigError(
            "model.dtype: bfloat16 would store the weights being trained in bfloat16, where AdamW updates "
            f"at optimizer.lr={cfg.optimizer.lr:g} round to nothing (no fp32 master weights). For full "
            "fine-tuning set model.dtype: float32 and bf16: true (bfloat16 compute over float32 weights); "
            "bfloat16 weights are only for a frozen base under LoRA (add a peft: block)"
        )


def load_train_config(source: str | Path | dict[str, Any], overrides: Sequence[str] = ()) -> TrainConfig:
    """Load and fully validate a training recipe (nothing heavy is loaded).

    Args:
        source: a recipe YAML path, a shipped recipe name (see ``embedtune ls``) or a mapping.
        overrides: ``key.path=value`` strings.

    Raises:
        ConfigError: the recipe is invalid; the message names the file and key path.
    """
    if isinstance(source, str) and not Path(source).exists():
        from embedtune.recipes import recipe_path

        shipped = recipe_path(source)
        if shipped is not None:
            source = shipped
    return load_config(TrainConfig, source, overrides)
