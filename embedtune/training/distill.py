"""Distillation from a cross-encoder: a KL term between the reranker's and the bi-encoder's scores.

For each query the bi-encoder's scores over its own group (positive + hard negatives) and the
teacher's scores over the same passages are turned into distributions and compared::

    p_teacher = softmax(t / τ_t)         t: (B, n) teacher logits (e.g. ``ce_score`` from ``embedtune mine``)
    p_student = softmax(s / τ_s)         s: (B, n) cosine scores of the bi-encoder
    loss      = mean_b KL(p_teacher ‖ p_student) = Σ_j p_t log p_t − p_t log p_s

This is the listwise distillation of RocketQAv2 / FlagEmbedding (teacher scores stored beside the
mined negatives or computed on the fly). Added to InfoNCE with a weight:
``loss = info_nce + distill.weight * distillation_kl(...)``. ``τ_s`` should equal the InfoNCE
temperature so both terms see the same logits; ``τ_t`` sets how sharp the teacher is (1.0 for raw
cross-encoder logits). Passages without a teacher score (``mask`` False) are left out of both
distributions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from embedtune.errors import ConfigError
from embedtune.training.config import TrainConfig
from embedtune.training.recipe import BiEncoderRecipe

__all__ = [
    "DistillConfig",
    "DistillTrainConfig",
    "DistillationRecipe",
    "OnlineTeacher",
    "TeacherScores",
    "distillation_kl",
    "group_scores",
    "load_distill_config",
    "train_with_distillation",
]


@dataclass
class DistillConfig:
    """The ``distill:`` block of a training recipe (null: no distillation)."""

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


def group_scores(queries: Tensor, passages: Tensor, n_passages: int) -> Tensor:
    """Each query's scores over its own group of passages.

    Args:
        queries: (B, d) query embeddings.
        passages: (B * n_passages, d), grouped by query, positive first (the collator's layout).
        n_passages: passages per query.

    Returns:
        (B, n_passages) dot products.
    """
    groups = passages.view(queries.shape[0], n_passages, -1)  # (B, n, d)
    return torch.einsum("bd,bnd->bn", queries, groups)


def distillation_kl(
    student_scores: Tensor,
    teacher_scores: Tensor,
    *,
    student_temperature: float = 0.02,
    teacher_temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Mean over queries of KL(softmax(teacher / τ_t) ‖ softmax(student / τ_s)).

    Args:
        student_scores: (B, n) bi-encoder scores (differentiable).
        teacher_scores: (B, n) teacher scores (no gradient flows into them).
        student_temperature: τ_s.
        teacher_temperature: τ_t.
        mask: (B, n) bool, True where the teacher has a score; rows need at least one True.

    Returns:
        Scalar loss (0 exactly when the two distributions are equal).

    Raises:
        ConfigError: shapes differ or a temperature is not positive.
    """
    if student_scores.shape != teacher_scores.shape:
        raise ConfigError(
            f"student scores {tuple(student_scores.shape)} and teacher scores {tuple(teacher_scores.shape)} "
            "must have the same (batch, passages) shape — one teacher score per passage"
        )
    if not (student_temperature > 0 and teacher_temperature > 0):
        raise ConfigError("distillation temperatures must be > 0")
    s = student_scores.float() / student_temperature
    t = teacher_scores.detach().float() / teacher_temperature
    if mask is not None:
        mask = mask.to(torch.bool)
        s = s.masked_fill(~mask, float("-inf"))
        t = t.masked_fill(~mask, float("-inf"))
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    p_t = log_p_t.exp()
    # Masked entries have p_t = 0; write their terms as 0 instead of 0 * (-inf - -inf) = nan.
    terms = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), torch.zeros_like(p_t))
    return terms.sum(dim=-1).mean()


# ------------------------------------------------------------------------------ teacher scores


def _pair_key(query: str, passage: str) -> tuple[int, int]:
    from embedtune.data.corpus import text_hash

    return text_hash(query), text_hash(passage)


class TeacherScores:
    """Teacher scores of (query, passage) pairs, looked up by text (as the training batches carry them).

    Built from a file written by ``embedtune mine --reranker`` (each ``pos_doc``/``neg_doc`` entry has
    a ``ce_score``), or from any mapping. Keys are hashes of the query and passage *texts*, so the same
    pair matches whichever file, corpus or row it came from.

    Args:
        scores: ``{(text_hash(query), text_hash(passage)): score}``.
    """

    def __init__(self, scores: dict[tuple[int, int], float]) -> None:
        self.scores = scores

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def from_mined_file(cls, path: str, score_field: str = "ce_score") -> TeacherScores:
        """Read teacher scores from a mined corpus-ID ``.json`` or inline ``.jsonl`` file.

        Raises:
            ConfigError: the file holds no ``score_field`` at all (mine with ``--reranker``).
        """
        import json
        from pathlib import Path

        from embedtune.data.formats import read_training_file

        data = read_training_file(path)
        p = Path(path)
        if data.format == "inline":
            records = [
                json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()
            ]
        else:
            records = json.loads(p.read_text(encoding="utf-8"))["data"]
        scores: dict[tuple[int, int], float] = {}
        for i, rec in enumerate(records):
            for key, rows in (("pos_doc", data.positives(i)), ("neg_doc", data.negatives(i))):
                entries = rec.get(key) or []
                entries = entries if isinstance(entries, list) else [entries]
                for entry, row in zip(entries, rows.tolist()):
                    if isinstance(entry, dict) and score_field in entry:
                        scores[_pair_key(data.queries[i], data.corpus.text(row))] = float(entry[score_field])
        if not scores:
            raise ConfigError(
                f"{path}: no '{score_field}' in any pos_doc/neg_doc entry — mine with "
                "`embedtune mine --reranker DIR` to store teacher scores, or compute them on the fly"
            )
        return cls(scores)

    def matrix(self, queries: list[str], passages: list[list[str]]) -> tuple[Tensor, Tensor]:
        """Teacher scores of a batch: ``(scores (B, n) float32, mask (B, n) bool)``; mask False = unknown."""
        b, n = len(queries), len(passages[0]) if passages else 0
        out = torch.zeros(b, n)
        mask = torch.zeros(b, n, dtype=torch.bool)
        for i, (q, ps) in enumerate(zip(queries, passages)):
            for j, p in enumerate(ps):
                s = self.scores.get(_pair_key(q, p))
                if s is not None:
                    out[i, j], mask[i, j] = s, True
        return out, mask


class OnlineTeacher:
    """Teacher scores computed on the fly by a cross-encoder (``CrossEncoderReranker``), same interface.

    Args:
        reranker: the teacher.
        batch_size: pairs per forward pass.
        bf16: bfloat16 autocast.
    """

    def __init__(self, reranker: object, batch_size: int = 64, bf16: bool = False) -> None:
        self.reranker = reranker
        self.batch_size = batch_size
        self.bf16 = bf16

    def matrix(self, queries: list[str], passages: list[list[str]]) -> tuple[Tensor, Tensor]:
        """Score every pair; the mask is all True."""
        flat_q = [q for q, ps in zip(queries, passages) for _ in ps]
        flat_p = [p for ps in passages for p in ps]
        s = self.reranker.predict(flat_q, flat_p, batch_size=self.batch_size, bf16=self.bf16)  # type: ignore[attr-defined]
        scores = torch.as_tensor(s, dtype=torch.float32).view(len(queries), -1)
        return scores, torch.ones_like(scores, dtype=torch.bool)


# ------------------------------------------------------------------------------ the recipe


@dataclass
class DistillTrainConfig(TrainConfig):
    """A training recipe (every key of ``embedtune train``) plus an optional ``distill:`` block."""

    distill: DistillConfig | None = None
    """KL distillation from a reranker's scores (null: plain contrastive training)."""


def load_distill_config(
    source: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = ()
) -> DistillTrainConfig:
    """Load a training recipe that may hold a ``distill:`` block.

    Raises:
        ConfigError: invalid recipe, naming the file and key.
    """
    from embedtune.config import load_config

    return load_config(DistillTrainConfig, source, list(overrides))


class _TeacherBatches:
    """The recipe's ``TrainingData`` with teacher scores attached to every collated batch."""

    def __init__(self, data: object, teacher: object) -> None:
        self.data, self.teacher = data, teacher

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self.data, name)

    def batch(self, epoch: int, step_in_epoch: int, batch_size: int) -> dict:
        ds = self.data.dataset  # type: ignore[attr-defined]
        ds.set_epoch(epoch)
        start = step_in_epoch * batch_size
        items = [ds[i] for i in range(start, start + batch_size)]
        out = self.data.collator(items)  # type: ignore[attr-defined]
        out["teacher"], out["teacher_mask"] = self.teacher.matrix(  # type: ignore[attr-defined]
            [it.query for it in items], [list(it.passages) for it in items]
        )
        return out


class _DistillLoss(torch.nn.Module):
    """The recipe's contrastive loss + ``weight * distillation_kl`` on the current micro-batch's groups."""

    def __init__(
        self, base: torch.nn.Module, cfg: DistillConfig, student_temperature: float, recipe: object
    ) -> None:
        super().__init__()
        self.base, self.cfg, self.tau_s, self.recipe = base, cfg, student_temperature, recipe
        self.last_kl: float | None = None

    def forward(
        self,
        queries: Tensor,
        passages: Tensor,
        *,
        n_passages: int,
        doc_ids: Tensor | None = None,
        positive_ids: Tensor | None = None,
        offset: int = 0,
    ) -> Tensor:
        loss = self.base(
            queries,
            passages,
            n_passages=n_passages,
            doc_ids=doc_ids,
            positive_ids=positive_ids,
            offset=offset,
        )
        teacher, mask = self.recipe._teacher_mb  # type: ignore[attr-defined]
        b = queries.shape[0]
        # This micro-batch's own groups: rows [offset * n, (offset + b) * n) of the passages.
        own = passages[offset * n_passages : (offset + b) * n_passages]
        student = group_scores(queries, own, n_passages)  # (b, n)
        rows = mask.any(dim=1)
        if rows.any() and self.cfg.weight > 0:
            kl = distillation_kl(
                student[rows.to(student.device)],
                teacher[rows].to(student.device),
                student_temperature=self.tau_s,
                teacher_temperature=self.cfg.teacher_temperature,
                mask=mask[rows].to(student.device),
            )
            self.last_kl = float(kl.detach())
            loss = loss + self.cfg.weight * kl
        return loss


class DistillationRecipe(BiEncoderRecipe):
    """``BiEncoderRecipe`` + a KL term to a reranker's scores (``distill:`` block of the recipe).

    Teacher scores travel with each collated batch (``teacher``, ``teacher_mask``: (B, n_passages)),
    are sliced with the micro-batches, and the loss adds
    ``distill.weight * distillation_kl(student group scores, teacher scores)``. With ``distill: null``
    it is exactly the base recipe.
    """

    def setup(self) -> None:
        super().setup()
        d = self.cfg.distill
        if d is None:
            return
        self.data = _TeacherBatches(self.data, self._build_teacher(d))
        tau_s = d.student_temperature or self.cfg.loss.temperature
        self.loss_fn = _DistillLoss(self.loss_fn, d, tau_s, self)

    def _build_teacher(self, d: DistillConfig) -> object:
        source = d.teacher or self.cfg.data.datasets[0].path
        if Path(source).is_dir() and not (Path(source) / "corpus.jsonl").is_file():
            from embedtune.reranker import CrossEncoderReranker

            ce = CrossEncoderReranker.from_pretrained(source, device=self.device)
            return OnlineTeacher(ce, batch_size=d.teacher_batch_size, bf16=self.cfg.bf16)
        return TeacherScores.from_mined_file(str(source), d.score_field)

    def _micro_batches(self, batch: dict) -> object:
        offset = 0
        for mb in super()._micro_batches(batch):
            if "teacher" in batch:
                b = mb["query"]["input_ids"].shape[0]
                mb["teacher"] = batch["teacher"][offset : offset + b]
                mb["teacher_mask"] = batch["teacher_mask"][offset : offset + b]
                offset += b
            yield mb

    def _negative_ids(self, mb: dict) -> Tensor | None:
        # Called once per micro-batch right before its loss: the loss reads the teacher from here.
        if "teacher" in mb:
            self._teacher_mb = (mb["teacher"], mb["teacher_mask"])
        return super()._negative_ids(mb)


def train_with_distillation(cfg: DistillTrainConfig) -> Any:
    """Run a whole recipe with distillation: setup, train, cleanup (``embedtune rerank distill``).

    Returns:
        The recipe's ``TrainResult``.
    """
    recipe = DistillationRecipe(cfg)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()
