"""Contrastive fine-tuning of bi-encoders.

Modules:
    config      ``TrainConfig`` and its blocks; ``load_train_config`` (typed, validated, overrides).
    recipe      ``BiEncoderRecipe``: setup → train → cleanup; ``train(cfg)`` runs a whole recipe.
    loss        ``InfoNCELoss`` / ``info_nce``: hard + in-batch negatives, ID masking, Matryoshka.
    gradcache   ``GradCache``: the loss over a large batch, encoded chunk by chunk, exact gradients.
    checkpoint  ``CheckpointManager``: atomic, rotating, resumable checkpoints; RNG capture/restore.
    optim       optimizer and LR-schedule registries (``adamw``, ``sgd``; ``constant|linear|cosine``).
    monitor     progress bar, ``metrics.jsonl``, TensorBoard (optional), ``loss.png``.
    validate    ``check_recipe``: files, model architecture and LoRA targets, without loading weights.
"""
