"""``Validator``: full-corpus retrieval evaluation during training, best-checkpoint choice, early stopping.

What the training recipe does with it::

    validator = Validator(cfg.validation) if cfg.validation else None
    ...
    if validator and validator.should_run(step, last_step=step == total_steps):
        metrics = validator.run(model, step)          # {"ndcg@10": ..., ...}; logged by the caller
        if validator.improved:
            save_checkpoint(out / "best")             # best so far by cfg.validation.metric
        if validator.should_stop:
            break                                     # early stopping
    ...
    state["validator"] = validator.state_dict()      # resumable: history, best, patience counter

Only one process should call ``run`` in distributed training (rank 0), with the others waiting.
The evaluation set (and its ``max_queries``/``max_corpus`` sample) is loaded once, on the first call,
so every evaluation scores the same queries against the same documents.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from embedtune.eval.config import ValidationConfig
from embedtune.eval.datasets import EvalSet, load_eval_set
from embedtune.eval.retrieval import run_evaluation

logger = logging.getLogger("embedtune.eval")


def is_better(value: float, best: float | None, min_delta: float = 0.0) -> bool:
    """Whether ``value`` improves on ``best`` by more than ``min_delta`` (all metrics: higher is better).

    Args:
        value: the new metric value.
        best: the best value so far (None: nothing yet, so any value is better).
        min_delta: the smallest increase that counts.
    """
    return best is None or value > best + min_delta


class Validator:
    """Evaluates a model on a held-out set every ``every_n_steps`` and tracks the best step.

    Args:
        config: the recipe's ``validation:`` block.
        eval_set: an already loaded evaluation set (default: read ``config.data`` on the first ``run``).

    Attributes:
        history: ``[(step, metrics), ...]`` in evaluation order.
        best_value: best value of ``config.metric`` so far (None before the first evaluation).
        best_step: the step that reached it.
        improved: whether the last ``run`` set a new best (save the best checkpoint now).
        bad_evals: evaluations in a row without improvement.
    """

    def __init__(self, config: ValidationConfig, eval_set: EvalSet | None = None) -> None:
        self.config = config
        self._eval_set = eval_set
        self.history: list[tuple[int, dict[str, float]]] = []
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.improved = False
        self.bad_evals = 0
        self._run: dict[str, dict[str, float]] | None = None
        #: ``config.retriever``'s own metrics (``recipe: rerank``), once it has searched.
        self.retriever_metrics: dict[str, float] = {}

    @property
    def eval_set(self) -> EvalSet:
        """The (possibly sampled) evaluation set, loaded on first use."""
        if self._eval_set is None:
            c = self.config
            full = load_eval_set(c.data, c.split, ignore_identical_ids=c.ignore_identical_ids)
            self._eval_set = full.subset(c.max_queries, c.max_corpus, c.seed)
            logger.info(
                "validation set %s: %d queries, %d documents",
                c.data,
                len(self._eval_set.queries),
                len(self._eval_set.corpus),
            )
        return self._eval_set

    def should_run(self, step: int, *, last_step: bool = False) -> bool:
        """Whether to evaluate after optimizer step ``step`` (step 0 = before training)."""
        if step == 0:
            return self.config.eval_at_start
        return last_step or step % self.config.every_n_steps == 0

    def run(self, encoder: Any, step: int) -> dict[str, float]:
        """Evaluate ``encoder`` now and update the best step and the early-stopping counter.

        Args:
            encoder: the model being trained (a ``BiEncoder``; with ``config.retriever``, the
                ``CrossEncoderReranker`` that reranks the retriever's run); its train/eval mode is restored.
            step: the optimizer step, for the history.

        Returns:
            The metrics (``"ndcg@10"``, ``"recall@100"``, ...) plus ``"eval_seconds"``.
        """
        c = self.config
        t0 = time.perf_counter()
        if c.retriever:
            metrics = self._reranked(encoder)
        else:
            metrics = dict(self._evaluate(encoder).metrics)
        value = metrics[c.metric]
        self.improved = is_better(value, self.best_value, c.min_delta)
        if self.improved:
            self.best_value, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        metrics["eval_seconds"] = time.perf_counter() - t0
        self.history.append((step, metrics))
        return metrics

    def _evaluate(self, encoder: Any, **extra: Any) -> Any:
        """Full-corpus retrieval of the validation set with ``encoder``, at the block's settings."""
        c = self.config
        return run_evaluation(
            encoder,
            self.eval_set,
            c.k_values,
            batch_size=c.batch_size,
            bf16=c.bf16,
            max_length=c.max_length,
            backend=c.backend,
            show_progress=False,
            **extra,
        )

    def retrieved(self, device: Any = "cpu") -> dict[str, dict[str, float]]:
        """``config.retriever``'s run on the validation set (searched on the first call, then kept)."""
        if self._run is None:
            from embedtune.models import AutoBiEncoder

            c = self.config
            retriever = AutoBiEncoder.from_pretrained(c.retriever, device=device)
            result = self._evaluate(retriever, top_k=max(max(c.k_values), c.rerank_top_k))
            self._run, self.retriever_metrics = result.run, dict(result.metrics)
            logger.info("validation retriever %s: %s %.4f", c.retriever, c.metric, result.metrics[c.metric])
        return self._run

    def _reranked(self, reranker: Any) -> dict[str, float]:
        """The metrics of the retriever's top ``rerank_top_k`` reordered by ``reranker``."""
        from embedtune.eval.metrics import compute_metrics
        from embedtune.reranker.evaluate import rerank_run

        c, es = self.config, self.eval_set
        run = self.retrieved(getattr(reranker, "device", "cpu"))
        scores = rerank_run(
            reranker, es.queries, run, es.corpus, top_k=c.rerank_top_k, batch_size=c.batch_size, bf16=c.bf16
        )
        metrics = compute_metrics(es.qrels, scores, c.k_values)
        metrics[f"retriever_{c.metric}"] = self.retriever_metrics[c.metric]
        return metrics

    @property
    def should_stop(self) -> bool:
        """Early stopping: ``early_stopping_patience`` evaluations in a row without improvement."""
        patience = self.config.early_stopping_patience
        return patience is not None and self.bad_evals >= patience

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (JSON-serialisable)."""
        return {
            "history": [[s, m] for s, m in self.history],
            "best_value": self.best_value,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "metric": self.config.metric,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()`` (after resuming a run)."""
        self.history = [(int(s), dict(m)) for s, m in state["history"]]
        self.best_value = state["best_value"]
        self.best_step = state["best_step"]
        self.bad_evals = int(state["bad_evals"])
        self.improved = False
