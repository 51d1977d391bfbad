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

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from embedtune.errors import ConfigError
from embedtune.training.config import DistillConfig, TrainConfig
from embedtune.training.parallel import Parallel
from embedtune.training.tasks import BiEncoderTask, TrainingData

__all__ = [
    "DistillConfig",
    "DistillTask",
    "OnlineTeacher",
    "TeacherBatches",
    "TeacherScores",
    "distillation_kl",
    "group_scores",
]


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


# ------------------------------------------------------------------------------ the task


class TeacherBatches:
    """The bi-encoder's training data with the teacher's scores as batch fields.

    ``collate(epoch, positions)`` adds ``teacher`` (B, n_passages) float32 scores and ``teacher_mask``
    (B, n_passages) bool (False: no score for that pair) for exactly the collated examples.

    Args:
        data: the bi-encoder's :class:`~embedtune.training.tasks.TrainingData`.
        teacher: :class:`TeacherScores` or :class:`OnlineTeacher`.
    """

    def __init__(self, data: TrainingData, teacher: Any) -> None:
        self.data, self.teacher = data, teacher

    def __len__(self) -> int:
        return len(self.data)

    def collate(self, epoch: int, positions: Sequence[int]) -> dict[str, Any]:
        """The collated examples plus ``teacher`` / ``teacher_mask``."""
        items = self.data.items(epoch, positions)
        out = self.data.collator(items)
        out["teacher"], out["teacher_mask"] = self.teacher.matrix(
            [it.query for it in items], [list(it.passages) for it in items]
        )
        return out

    def batch(self, epoch: int, step_in_epoch: int, batch_size: int) -> dict[str, Any]:
        """The whole collated global batch number ``step_in_epoch`` of ``epoch`` (tests)."""
        start = step_in_epoch * batch_size
        return self.collate(epoch, range(start, start + batch_size))


class DistillTask(BiEncoderTask):
    """The bi-encoder task + ``distill.weight * distillation_kl(student group scores, teacher scores)``.

    The KL term is computed per micro-batch from the *local* queries and their own groups (the teacher
    scores each query's own passages only), so it needs no gather: under DDP the averaged gradient of
    the per-rank means is the gradient of the global mean, as for the contrastive term. With GradCache
    the term is part of the cached loss.

    Args:
        cfg: a recipe with a ``distill:`` block.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        if cfg.distill is None:
            raise ConfigError("distill: DistillTask needs a distill: block in the recipe")
        super().__init__(cfg)
        self.distill = cfg.distill
        self.student_temperature = cfg.distill.student_temperature or cfg.loss.temperature
        self.last_kl: float | None = None

    def batches(self, model: nn.Module) -> TeacherBatches:
        """The training data with teacher scores attached to every micro-batch."""
        return TeacherBatches(super().batches(model), self._build_teacher(Parallel.unwrap(model)))

    def _build_teacher(self, model: nn.Module) -> Any:
        d = self.distill
        source = d.teacher or self.cfg.data.datasets[0].path
        if Path(source).is_dir() and not (Path(source) / "corpus.jsonl").is_file():
            from embedtune.reranker import CrossEncoderReranker

            device = next(model.parameters()).device
            ce = CrossEncoderReranker.from_pretrained(source, device=device)
            return OnlineTeacher(ce, batch_size=d.teacher_batch_size, bf16=self.cfg.bf16)
        return TeacherScores.from_mined_file(str(source), d.score_field)

    def extra_loss(
        self, queries: Tensor, passages: Tensor, batch: dict[str, Any], n_passages: int
    ) -> Tensor | None:
        """``weight * KL`` over the queries that have at least one teacher score (None: none has)."""
        teacher, mask = batch["teacher"].to(queries.device), batch["teacher_mask"].to(queries.device)
        rows = mask.any(dim=1)
        if self.distill.weight == 0 or not bool(rows.any()):
            return None
        student = group_scores(queries, passages, n_passages)  # (b, n): each query's own group
        kl = distillation_kl(
            student[rows],
            teacher[rows],
            student_temperature=self.student_temperature,
            teacher_temperature=self.distill.teacher_temperature,
            mask=mask[rows],
        )
        self.last_kl = float(kl.detach())
        return self.distill.weight * kl
