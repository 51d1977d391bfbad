"""Prove that an ONNX export computes the embeddings of the PyTorch model it came from.

Verification tokenises real sentences of very different lengths (one word to a truncated paragraph)
into padded batches, as queries and as documents, padded on the right *and* on the left, runs the
PyTorch model and ONNX Runtime on the same token ids, and compares the pooled vectors: the largest
absolute difference and the smallest cosine. Mixed lengths in one batch exercise the attention mask,
both padding sides exercise ``last``/``cls`` pooling and position handling, and the query prefix
exercises the instruction mask.

For quantised exports the cosine alone does not say whether retrieval still works, so
:func:`retrieval_ndcg` measures NDCG@10 on a small BEIR slice for two encoders.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Real text, deliberately uneven: a single word, short queries, sentences and a long paragraph that
# is truncated at max_length. Scientific and everyday English, punctuation and digits.
VERIFY_TEXTS: tuple[str, ...] = (
    "Vaccines",
    "how do vaccines work?",
    "What is the boiling point of water at 2,000 m altitude?",
    "Mitochondria are the site of oxidative phosphorylation in eukaryotic cells.",
    "The committee postponed its decision on the new railway line until the spring of 2027.",
    "ok",
    "Aspirin irreversibly inhibits cyclooxygenase-1, which reduces thromboxane A2 synthesis in "
    "platelets and explains its antithrombotic effect at low doses.",
    "Python 3.12 removed the distutils module; projects should build with setuptools or hatchling.",
    (
        "Retrieval models map queries and documents into one vector space so that relevant pairs lie "
        "close together. Bi-encoders embed each side independently, which lets a corpus be encoded once "
        "and searched with a nearest-neighbour index, while cross-encoders read the query and document "
        "together and are more accurate but far slower. Contrastive training with in-batch and hard "
        "negatives is the standard recipe; the temperature of the softmax controls how sharply the "
        "model separates positives from negatives, and large batches give more negatives for free. "
    )
    * 6,
    "A 3-year randomized trial found no difference in mortality (HR 0.98, 95% CI 0.91-1.06).",
    "Does smoking increase the risk of type 2 diabetes?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
)
# Each export must agree with PyTorch at least this well (worst cosine over the verification texts);
# ``--min-cosine`` overrides it. int8 is a lossy format: its gate is lower, but an int8 model that has
# lost its geometry (worst cosine far below this) is refused rather than written.
MIN_COSINE: dict[str, float] = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.95}
VERIFY_BATCH_SIZE = 4


@dataclass
class Batch:
    """One tokenised verification batch, as int64 numpy arrays (batch, seq)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    pooling_mask: np.ndarray
    kind: str
    padding_side: str


@dataclass
class ParityReport:
    """How closely two encoders agree on the verification batches."""

    max_abs_diff: float
    min_cosine: float
    mean_cosine: float
    num_texts: int
    num_batches: int
    padding_sides: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self, label: str) -> str:
        return (
            f"{label}: {self.num_texts} embeddings in {self.num_batches} padded batches "
            f"({'/'.join(self.padding_sides)} padding): max |diff| {self.max_abs_diff:.2e}, "
            f"min cosine {self.min_cosine:.6f}, mean {self.mean_cosine:.6f}"
        )


def verification_batches(
    tokenizer: Any,
    settings: Any,
    texts: Sequence[str] = VERIFY_TEXTS,
    *,
    padding_sides: Sequence[str] = ("right", "left"),
    batch_size: int = VERIFY_BATCH_SIZE,
    max_length: int | None = None,
) -> list[Batch]:
    """Tokenise ``texts`` as queries and as documents into padded batches of mixed lengths.

    The tokenizer's padding side is restored afterwards.
    """
    from embedtune.models.tokenization import tokenize_texts

    texts = list(texts)
    batches: list[Batch] = []
    original_side = tokenizer.padding_side
    try:
        for side in padding_sides:
            tokenizer.padding_side = side
            for kind in ("query", "document"):
                for start in range(0, len(texts), batch_size):
                    feats = tokenize_texts(
                        tokenizer,
                        texts[start : start + batch_size],
                        prefixes=settings.prefix_for(kind),
                        max_length=max_length or settings.max_length,
                        pool_prefix=settings.pool_instruction,
                    )
                    batches.append(
                        Batch(
                            input_ids=feats["input_ids"].numpy(),
                            attention_mask=feats["attention_mask"].numpy(),
                            pooling_mask=feats["pooling_mask"].numpy(),
                            kind=kind,
                            padding_side=side,
                        )
                    )
    finally:
        tokenizer.padding_side = original_side
    return batches


def embed_batches(encoder: Callable[..., Any], batches: Sequence[Batch]) -> list[np.ndarray]:
    """Run ``encoder(input_ids, attention_mask, pooling_mask)`` on each batch (torch or ONNX)."""
    outputs: list[np.ndarray] = []
    is_torch = _is_torch_module(encoder)
    if is_torch:
        import torch

        device = next(encoder.parameters()).device
        with preserved_modes(encoder):
            encoder.eval()
            with torch.inference_mode():
                for b in batches:
                    emb = encoder(
                        torch.from_numpy(b.input_ids).to(device),
                        torch.from_numpy(b.attention_mask).to(device),
                        torch.from_numpy(b.pooling_mask).to(device),
                    )
                    outputs.append(emb.float().cpu().numpy())
    else:
        for b in batches:
            outputs.append(
                np.asarray(encoder(b.input_ids, b.attention_mask, b.pooling_mask), dtype=np.float32)
            )
    return outputs


@contextmanager
def preserved_modes(module: Any) -> Iterator[None]:
    """Restore every submodule's train/eval flag on exit.

    ``module.train(was_training)`` is not enough: a freshly built ``BiEncoder`` is in train mode while
    its loaded backbone is in eval mode, and ``train(True)`` would switch the backbone's dropout on.
    """
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _is_torch_module(obj: Any) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return False
    return isinstance(obj, torch.nn.Module)


def compare(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], batches: Sequence[Batch]
) -> ParityReport:
    """Max absolute difference and min/mean cosine between two lists of (batch, dim) embeddings."""
    ref = np.concatenate([np.asarray(r, dtype=np.float64) for r in reference])
    got = np.concatenate([np.asarray(c, dtype=np.float64) for c in candidate])
    if ref.shape != got.shape:
        from embedtune.export.errors import VerificationError

        raise VerificationError(f"the ONNX model returned shape {got.shape}, PyTorch {ref.shape}")
    # Cosine of each pair; a zero vector on one side only gives 0 (a clear failure), on both sides 1.
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    dots = (ref * got).sum(1)
    cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 1.0)
    if not np.isfinite(got).all():
        cos = np.where(np.isfinite(got).all(1), cos, -1.0)
    return ParityReport(
        max_abs_diff=float(np.nanmax(np.abs(ref - got))) if np.isfinite(got).all() else math.inf,
        min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
        num_texts=int(ref.shape[0]),
        num_batches=len(batches),
        padding_sides=tuple(dict.fromkeys(b.padding_side for b in batches)),
    )


# ------------------------------------------------------------------------------ retrieval (int8)
@dataclass
class SmallEvalSet:
    """A BEIR slice small enough to encode in seconds: some queries, their relevant documents and
    distractors."""

    name: str
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    doc_ids: list[str]
    doc_texts: list[str]


# Tokens per text in the int8 NDCG check: enough for SciFact abstracts' opening, fast enough for an export.
NDCG_MAX_LENGTH = 256


def bundled_eval_data() -> Path | None:
    """The BEIR folder for the int8 NDCG check when none is given.

    ``$EMBEDTUNE_EVAL_DATA`` when set, else the bundled ``data/scifact-mini/test`` (in a source checkout,
    or under the current directory); None when neither exists.
    """
    import os

    env = os.environ.get("EMBEDTUNE_EVAL_DATA")
    if env:
        return Path(env)
    package_root = Path(__file__).resolve().parents[2]
    for root in (package_root, Path.cwd()):
        candidate = root / "data" / "scifact-mini" / "test"
        if (candidate / "corpus.jsonl").is_file():
            return candidate
    return None


def small_beir_slice(
    folder: str | Path,
    *,
    split: str = "test",
    max_queries: int = 50,
    max_docs: int = 500,
    seed: int = 0,
) -> SmallEvalSet:
    """The first ``max_queries`` judged queries of a BEIR folder, their relevant documents, and random
    distractors up to ``max_docs`` documents (fixed by ``seed``).

    Raises:
        DataError: the folder is not a BEIR folder (from :func:`embedtune.data.formats.load_beir`).
    """
    from embedtune.data.formats import load_beir

    data = load_beir(folder, split)
    qids = [q for q in data.queries if any(r > 0 for r in data.qrels.get(q, {}).values())][:max_queries]
    relevant = sorted({d for q in qids for d, r in data.qrels[q].items() if r > 0})
    rest = sorted(set(data.corpus.ids) - set(relevant))
    distractors = random.Random(seed).sample(rest, max(0, min(len(rest), max_docs - len(relevant))))
    doc_ids = relevant + sorted(distractors)
    keep = set(doc_ids)
    texts = data.corpus.texts([data.corpus.index_of(d) for d in doc_ids])
    return SmallEvalSet(
        name=f"{'/'.join(Path(folder).parts[-2:])}[{split}, {len(qids)} queries, {len(doc_ids)} docs]",
        queries={q: data.queries[q] for q in qids},
        qrels={q: {d: r for d, r in data.qrels[q].items() if d in keep} for q in qids},
        doc_ids=doc_ids,
        doc_texts=texts,
    )


def retrieval_ndcg(
    encoder: Any, eval_set: SmallEvalSet, *, k: int = 10, batch_size: int = 16, max_length: int | None = None
) -> float:
    """NDCG@k of exact dot-product search over the slice (trec_eval semantics)."""
    from embedtune.eval.metrics import compute_metrics

    kw: dict[str, Any] = {"batch_size": batch_size, "show_progress": False}
    if max_length is not None:
        kw["max_length"] = max_length
    qids = list(eval_set.queries)
    q = np.asarray(encoder.encode_queries([eval_set.queries[i] for i in qids], **kw), dtype=np.float32)
    d = np.asarray(encoder.encode_documents(eval_set.doc_texts, **kw), dtype=np.float32)
    scores = q @ d.T  # (queries, docs)
    top = np.argsort(-scores, axis=1, kind="stable")[:, : max(k, 100)]
    run = {
        qid: {eval_set.doc_ids[j]: float(scores[row, j]) for j in top[row]} for row, qid in enumerate(qids)
    }
    return compute_metrics(eval_set.qrels, run, k_values=(k,), metrics=("ndcg",))[f"ndcg@{k}"]


# The int8 NDCG check encodes the slice twice (fp32 and int8 graphs); on a CPU a large decoder can
# need many minutes for 500 documents, so the check stops at a time budget (both encoders always
# score the same documents) and says how much it covered.
NDCG_BUDGET_S = 120.0
NDCG_CHUNK = 32


@dataclass
class NdcgComparison:
    """NDCG@10 of a reference and a candidate encoder on the same (possibly budget-cut) slice."""

    reference: float
    candidate: float
    queries: int
    documents: int
    total_documents: int
    seconds: float

    @property
    def delta(self) -> float:
        return self.candidate - self.reference

    @property
    def complete(self) -> bool:
        return self.documents == self.total_documents


def compare_ndcg(
    reference: Any,
    candidate: Any,
    eval_set: SmallEvalSet,
    *,
    k: int = 10,
    batch_size: int = 16,
    max_length: int | None = None,
    budget_s: float | None = NDCG_BUDGET_S,
    log: Callable[[str], None] | None = None,
    clock: Callable[[], float] | None = None,
) -> NdcgComparison:
    """NDCG@k of two encoders on ``eval_set``, with progress lines and a time budget.

    Documents are encoded in chunks by both encoders in turn, relevant documents first (the order of
    ``small_beir_slice``). When ``budget_s`` runs out, the documents encoded so far form the slice for
    both, so the two numbers and their difference stay comparable.

    Args:
        reference, candidate: encoders with ``encode_queries``/``encode_documents``.
        eval_set: the slice.
        k: the NDCG cut-off.
        batch_size: texts per encoder call.
        max_length: tokens per text.
        budget_s: stop encoding documents after this many seconds (None: no limit).
        log: where progress lines go (one line per chunk at most every 10 s).
        clock: time source (tests).
    """
    import time

    from embedtune.eval.metrics import compute_metrics

    now = clock or time.perf_counter
    say = log or (lambda _line: None)
    kw: dict[str, Any] = {"batch_size": batch_size, "show_progress": False}
    if max_length is not None:
        kw["max_length"] = max_length
    started = now()
    qids = list(eval_set.queries)
    qtexts = [eval_set.queries[i] for i in qids]
    q = [np.asarray(enc.encode_queries(qtexts, **kw), dtype=np.float32) for enc in (reference, candidate)]
    total = len(eval_set.doc_texts)
    docs: list[list[np.ndarray]] = [[], []]
    done, last_said = 0, started
    while done < total:
        chunk = eval_set.doc_texts[done : done + NDCG_CHUNK]
        for side, enc in enumerate((reference, candidate)):
            docs[side].append(np.asarray(enc.encode_documents(chunk, **kw), dtype=np.float32))
        done += len(chunk)
        t = now()
        out_of_time = budget_s is not None and t - started >= budget_s and done < total
        if t - last_said >= 10 or out_of_time or done == total:
            say(f"NDCG@{k} check: {done}/{total} documents encoded twice, {t - started:.0f} s")
            last_said = t
        if out_of_time:
            say(
                f"NDCG@{k} check: stopped at the {budget_s:.0f} s budget; scoring on the first {done} of "
                f"{total} documents (relevant ones first) — raise --eval-budget for the whole slice"
            )
            break
    ids = eval_set.doc_ids[:done]
    keep = set(ids)
    qrels = {qid: {d: r for d, r in eval_set.qrels[qid].items() if d in keep} for qid in qids}
    values = []
    for side in (0, 1):
        scores = q[side] @ np.concatenate(docs[side]).T  # (queries, docs)
        top = np.argsort(-scores, axis=1, kind="stable")[:, : max(k, 100)]
        run = {qid: {ids[j]: float(scores[row, j]) for j in top[row]} for row, qid in enumerate(qids)}
        values.append(compute_metrics(qrels, run, k_values=(k,), metrics=("ndcg",))[f"ndcg@{k}"])
    return NdcgComparison(values[0], values[1], len(qids), done, total, now() - started)
