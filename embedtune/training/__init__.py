"""Training: one loop (``Recipe``) for every task (bi-encoder, distillation, reranker) and world size.

Modules:
    recipe         ``Recipe``: setup → train → cleanup; ``train(cfg) -> TrainResult`` runs a whole recipe.
    tasks          ``Task`` (what differs between tasks), ``BiEncoderTask``, ``task_for(cfg)``.
    distill        ``DistillTask``: the bi-encoder + a KL term to a cross-encoder's scores.
    parallel       ``Parallel`` (what differs between one process, DDP and FSDP2).
    process_group  ``DistributedConfig``, device resolution, joining the torchrun job.
    batching       ``BatchPlan``: the rows of each global batch a rank takes per accumulation step.
    collectives    gather with gradient (cross-rank negatives), gather, agreement on stop signals.
    wrapping       DDP / FSDP2 wrapping (fp32 shards + bf16 mixed precision), global grad norm/clipping.
    signals        ``StopSignals``: SIGTERM/SIGINT → finish the step, save, exit 143/130.
    config         ``TrainConfig`` and its blocks; ``load_train_config`` (typed, validated, overrides).
    loss           ``InfoNCELoss`` / ``info_nce``: hard + in-batch negatives, ID masking, Matryoshka.
    gradcache      ``GradCache``: the loss over a large batch, encoded chunk by chunk, exact gradients.
    checkpoint     ``Checkpointer``: one format for 1 process and N ranks (DCP), atomic, verified, exact resume.
    optim          optimizer and LR-schedule registries (``adamw``, ``sgd``; ``constant|linear|cosine``).
    monitor        progress bar, ``metrics.jsonl``, TensorBoard (optional), ``loss.png``.
    validate       ``check_recipe``: files, model architecture and LoRA targets, without loading weights.
"""

from typing import Any

__all__ = ["Recipe", "TrainResult", "train"]


def __getattr__(name: str) -> Any:
    # Lazy: importing embedtune.training.config (recipe validation) must not import the whole loop.
    if name in __all__:
        from embedtune.training import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module 'embedtune.training' has no attribute {name!r}")
