"""``recipe: rerank``: train a cross-encoder on the same data formats as the bi-encoder.

One optimizer step, readable top to bottom in :func:`train_reranker`:

1. take the next ``batch_size`` queries of the epoch (a seeded permutation per epoch);
2. build each query's group: its positive (one drawn from its positives) + ``group_size - 1``
   negatives — its own negatives from the file (mined ones), filled with random corpus documents
   that are not positives when it has too few;
3. score every (query, passage) pair of the batch: logits (batch, group_size);
4. softmax cross-entropy with the positive at index 0 (the listwise loss of NeMo's and
   FlagEmbedding's rerankers);
5. clip, step, schedule; checkpoint every ``ckpt_every_steps`` (atomic, resumable with the same
   ``CheckpointManager`` as the bi-encoder recipe); save the final model in a layout that
   ``sentence_transformers.CrossEncoder`` loads.

Optimizer and schedule come from ``embedtune.training.optim`` (same ``optimizer:`` and
``lr_scheduler:`` blocks as the bi-encoder recipe).
"""

from __future__ import annotations

import json
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from embedtune.errors import ConfigError, EmbedtuneError
from embedtune.training.optim import LRSchedulerConfig, OptimizerConfig

__all__ = ["RerankConfig", "RerankResult", "listwise_loss", "load_rerank_config", "train_reranker"]


@dataclass
class RerankConfig:
    """A reranker training recipe (YAML with ``recipe: rerank``)."""

    recipe: str = "rerank"
    """Which recipe this is; must be ``rerank``."""
    model: str = "minilm"
    """Backbone: a folder, hub id or short name; an encoder or a decoder (converted to bidirectional)."""
    data: str | list[str] = ""
    """Training data: corpus-ID ``.json`` (e.g. from ``embedtune mine``), inline ``.jsonl``, a BEIR folder
    or an ``hf://`` data set; a list of them is read as one data set."""
    split: str = "train"
    """BEIR qrels split."""
    negatives: str | None = None
    """BEIR only: a JSONL of mined negatives (``{"query_id", "neg_doc": [ids]}``)."""
    output_dir: str = "outputs/reranker"
    """Where the final model (``model/``) and checkpoints (``checkpoints/``) go."""
    template: str | None = None
    """``null``: text-pair input (BERT-style, sentence-transformers compatible); or a prompt such as
    ``"question:{query} \\n \\n passage:{passage}"`` (decoders)."""
    max_length: int = 256
    """Tokens per (query, passage) pair."""
    pooling: str | None = None
    """``avg``/``cls``/``last``: NeMo AutoModel's cross-encoder head on a Llama backbone (pooled hidden
    states through a bias-free score head); null: transformers' own head."""
    group_size: int = 8
    """Passages per query in the softmax: 1 positive + ``group_size - 1`` negatives."""
    batch_size: int = 8
    """Queries per optimizer step (``batch_size * group_size`` pairs)."""
    micro_batch_size: int | None = None
    """Queries per forward/backward (gradient accumulation); null = ``batch_size``."""
    num_epochs: int = 1
    """Passes over the queries."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides ``num_epochs``)."""
    max_time_minutes: float | None = None
    """Stop after this much training time (a checkpoint and the model are still saved)."""
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-5))
    """Optimizer (``embedtune.training.optim``)."""
    lr_scheduler: LRSchedulerConfig = field(default_factory=lambda: LRSchedulerConfig(warmup_ratio=0.1))
    """LR schedule (``embedtune.training.optim``)."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm (null: no clipping)."""
    bf16: bool = False
    """bfloat16 autocast."""
    seed: int = 42
    """Seed of the data order, negative fills and the head's initialisation."""
    ckpt_every_steps: int | None = None
    """Checkpoint period (null: only at the end)."""
    resume: bool = True
    """Continue from the latest checkpoint in ``output_dir/checkpoints`` when there is one."""
    device: str = "auto"
    """``auto`` (cuda when available), ``cpu`` or ``cuda``."""
    log_every_steps: int = 10
    """Print the loss every N steps."""

    def __post_init__(self) -> None:
        if self.recipe != "rerank":
            raise ConfigError(f"recipe: {self.recipe!r} — this loader reads rerank recipes only")
        if not self.data:
            raise ConfigError("data: missing — give a corpus-ID .json, an inline .jsonl or a BEIR folder")
        if self.group_size < 2:
            raise ConfigError(
                f"group_size: must be >= 2 (a positive and at least one negative), got {self.group_size}"
            )
        if self.batch_size < 1 or (self.micro_batch_size is not None and self.micro_batch_size < 1):
            raise ConfigError("batch_size / micro_batch_size: must be >= 1")
        if self.max_length < 8:
            raise ConfigError(f"max_length: must be >= 8, got {self.max_length}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device: {self.device!r} is not auto, cpu or cuda")


def load_rerank_config(
    source: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = ()
) -> RerankConfig:
    """Load and validate a rerank recipe (YAML path or mapping) with ``a.b=c`` overrides.

    Raises:
        ConfigError: unknown key, wrong type or invalid value, naming the key.
    """
    from embedtune.config import load_config

    return load_config(RerankConfig, source, list(overrides))


def listwise_loss(scores: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over each query's group with the positive in column 0.

    Args:
        scores: (batch, group_size) reranker logits, positive first.

    Returns:
        Scalar mean loss.
    """
    labels = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores.float(), labels)


@dataclass
class RerankResult:
    """What a reranker training run produced."""

    model_dir: Path
    steps: int
    final_loss: float
    elapsed_s: float
    stop_reason: str
    losses: list[float] = field(default_factory=list)


def build_groups(data: Any, indices: list[int], group_size: int, rng: random.Random) -> list[list[int]]:
    """Corpus rows of each query's group: a positive, then its negatives, filled at random.

    Random fills never pick one of the query's positives.
    """
    n_docs = len(data.corpus)
    groups = []
    for i in indices:
        pos = data.positives(i).tolist()
        negs = data.negatives(i).tolist()
        need = group_size - 1
        chosen = rng.sample(negs, need) if len(negs) >= need else list(negs)
        banned = set(pos) | set(chosen)
        while len(chosen) < need:
            if n_docs <= len(banned):
                raise EmbedtuneError(
                    f"{data.source}: the corpus has too few documents for group_size={group_size}; lower it"
                )
            r = rng.randrange(n_docs)
            if r not in banned:
                chosen.append(r)
                banned.add(r)
        groups.append([rng.choice(pos), *chosen])
    return groups


def train_reranker(cfg: RerankConfig, *, data: Any = None) -> RerankResult:
    """Train a cross-encoder reranker (see the module docstring for one step).

    Args:
        cfg: the validated recipe.
        data: already-read ``RetrievalData`` (default: read ``cfg.data``).

    Returns:
        Where the model was saved, the steps run, the losses.
    """
    from embedtune.data.formats import read_training_file
    from embedtune.reranker.model import CrossEncoderReranker
    from embedtune.training.checkpoint import (
        CheckpointManager,
        TrainState,
        capture_rng_state,
        restore_rng_state,
    )
    from embedtune.training.optim import build_optimizer, build_scheduler

    device = torch.device(
        "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)  # the new score head's initialisation
    if data is None:
        from embedtune.data.model import concat_data

        paths = [cfg.data] if isinstance(cfg.data, str) else list(cfg.data)
        data = concat_data([read_training_file(p, split=cfg.split, negatives=cfg.negatives) for p in paths])
    model = CrossEncoderReranker.from_pretrained(
        cfg.model, template=cfg.template, max_length=cfg.max_length, pooling=cfg.pooling, device=device
    )
    model.train()
    steps_per_epoch = len(data) // cfg.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(
            f"batch_size: {cfg.batch_size} is larger than the {len(data)} training queries; lower it"
        )
    total = cfg.max_steps or steps_per_epoch * cfg.num_epochs
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, total)
    out = Path(cfg.output_dir)
    ckpt = CheckpointManager(out / "checkpoints", keep_last=1)
    state = TrainState()
    if cfg.resume and ckpt.latest() is not None:
        c = ckpt.load(ckpt.latest())
        model.load_state_dict(c.model)
        optimizer.load_state_dict(c.optimizer)
        scheduler.load_state_dict(c.scheduler)
        restore_rng_state(c.rng)
        state = c.state
        print(f"resumed from {c.path} at step {state.step}", flush=True)

    def save_checkpoint() -> None:
        ckpt.save(
            model={k: v.detach().contiguous() for k, v in model.state_dict().items()},
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            state=state,
            rng=capture_rng_state(),
        )

    micro = cfg.micro_batch_size or cfg.batch_size
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    losses: list[float] = []
    reason = "max_steps" if cfg.max_steps else "epochs"
    t_start = time.perf_counter() - state.elapsed_s
    loss_value = float("nan")
    while state.step < total:
        # The epoch's order and each step's fills are pure functions of (seed, epoch, step): resumable.
        order = list(range(len(data)))
        random.Random(cfg.seed * 1_000_003 + state.epoch).shuffle(order)
        idx = order[state.step_in_epoch * cfg.batch_size : (state.step_in_epoch + 1) * cfg.batch_size]
        rng = random.Random(f"{cfg.seed}-{state.epoch}-{state.step_in_epoch}")
        groups = build_groups(data, idx, cfg.group_size, rng)
        optimizer.zero_grad(set_to_none=True)
        loss_value = 0.0
        for m0 in range(0, len(idx), micro):
            q_idx, g_rows = idx[m0 : m0 + micro], groups[m0 : m0 + micro]
            queries = [data.queries[i] for i, g in zip(q_idx, g_rows) for _ in g]
            passages = data.corpus.texts([r for g in g_rows for r in g])
            feats = {k: v.to(device) for k, v in model.tokenize(queries, passages).items()}
            with autocast:
                scores = model(**feats).view(len(q_idx), cfg.group_size)  # (micro, group)
            loss = listwise_loss(scores)
            if not torch.isfinite(loss):
                raise EmbedtuneError(f"step {state.step + 1}: the loss is {loss.item()}; lower optimizer.lr")
            (loss * len(q_idx) / len(idx)).backward()
            loss_value += loss.item() * len(q_idx) / len(idx)
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(loss_value)
        state.step += 1
        state.step_in_epoch += 1
        state.examples_seen += len(idx)
        if state.step_in_epoch >= steps_per_epoch:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        state.elapsed_s = time.perf_counter() - t_start
        if state.step % cfg.log_every_steps == 0 or state.step == total:
            print(
                json.dumps(
                    {
                        "step": state.step,
                        "epoch": state.epoch,
                        "loss": round(loss_value, 5),
                        "lr": scheduler.get_last_lr()[0],
                        "elapsed_s": round(state.elapsed_s, 1),
                    }
                ),
                flush=True,
            )
        if cfg.ckpt_every_steps and state.step % cfg.ckpt_every_steps == 0:
            save_checkpoint()
        if cfg.max_time_minutes is not None and state.elapsed_s >= 60 * cfg.max_time_minutes:
            reason = "time_budget"
            break
    if cfg.ckpt_every_steps:
        save_checkpoint()
    model_dir = model.save_pretrained(out / "model")
    return RerankResult(model_dir, state.step, loss_value, state.elapsed_s, reason, losses)
