"""Sampling training items: one query, its positive and n_passages - 1 negatives, per index.

Everything here is a pure function of ``(seed, epoch, index)``: the order of an epoch, which dataset
an index draws from, which positive and which negatives it gets, and which random documents fill a
short negative list. A resumed run therefore sees exactly the data the interrupted run would have.

* **Negatives**: epochs run in cycles of ``m = ceil(len(list) / (n_passages - 1))``; each cycle
  shuffles the example's list once (seeded by seed, example and cycle) and epoch ``j`` of the cycle
  takes the ``j``-th window of that shuffle (the cycle's last, short window is topped up from the
  next shuffle). So each epoch sees a random choice, no negative repeats within an item, and every
  negative is used once in every cycle of ``m`` epochs (not "always the first ones").
  ``negative_selection: first`` instead always takes the first ``n_passages - 1`` in file order
  (NeMo AutoModel's selection; with ``fill_negatives: repeat`` a short list repeats in order).
* **Positives** cycle: epoch ``e`` uses positive ``e mod len(positives)`` (``cycle_positive_docs:
  false``: always the first).
* **Instructions**: a corpus's metadata instructions apply when ``use_dataset_instruction`` is on; a
  non-empty instruction is followed by ``instruction_separator`` (``" "`` for NeMo's join).
* **Several datasets** share an epoch by weight (largest-remainder split of ``samples_per_epoch``); with
  ``same_dataset_per_batch`` consecutive ``batch_size`` indices come from one dataset (each dataset's
  share is rounded up to whole batches, by drawing more of its examples, so nothing is dropped).
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from embedtune.data.config import DataConfig, DatasetConfig
from embedtune.data.corpus import text_hash
from embedtune.data.formats import RetrievalData, read_training_file
from embedtune.data.model import Instructions
from embedtune.data.problems import DataValidationError, Problem

__all__ = ["TrainDataset", "TrainItem", "data_seed", "load_datasets", "sample_examples"]

# Stream tags so that the generators for different purposes never coincide.
_ORDER, _MIX, _NEG, _FILL = 1, 2, 3, 4


@dataclass(frozen=True)
class TrainItem:
    """What one index of :class:`TrainDataset` yields; the collator turns a list of these into tensors.

    Attributes:
        query: The query text (without instruction).
        passages: The positive first, then ``n_passages - 1`` negatives (texts, without instruction).
        doc_ids: 63-bit hashes of the passage texts, for false-negative masking in the loss.
        query_instruction: Instruction for the query; None means the model's default prefix.
        passage_instruction: Instruction for the passages; None means the model's default prefix.
        dataset: Which dataset (index into ``DataConfig.datasets``).
        example: Which example of that dataset.
        positive_ids: Hashes (as in ``doc_ids``) of *all* the example's positives, so the loss never
            scores one of them as a negative; empty means "only ``doc_ids[0]``".
    """

    query: str
    passages: tuple[str, ...]
    doc_ids: tuple[int, ...]
    query_instruction: str | None
    passage_instruction: str | None
    dataset: int
    example: int
    positive_ids: tuple[int, ...] = ()


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def load_datasets(config: DataConfig, seed: int | None = None) -> list[RetrievalData]:
    """Read and validate every dataset of ``config`` (all of them, before raising).

    A data set with ``num_samples`` is cut to its fixed subset here (seeded by :func:`data_seed`).

    Raises:
        DataValidationError: listing the problems of every file (not just the first bad one).
    """
    out: list[RetrievalData] = []
    problems: list[Problem] = []
    total = 0
    for spec in config.datasets:
        try:
            out.append(
                read_training_file(
                    spec.path,
                    spec.format,
                    config.on_bad_row,
                    split=spec.split,
                    negatives=spec.negatives,
                    cache_dir=config.cache_dir,
                )
            )
            if spec.num_samples is not None:
                out[-1] = sample_examples(out[-1], spec.num_samples, data_seed(config, seed))
        except DataValidationError as exc:
            problems += exc.problems
            total += exc.total
    if total:
        raise DataValidationError(problems, total)
    return out


def data_seed(config: DataConfig, seed: int | None = None) -> int:
    """The seed data sampling uses: ``config.seed``, else the recipe's, else 0."""
    return config.seed if config.seed is not None else (seed if seed is not None else 0)


def sample_examples(data: RetrievalData, num_samples: int, seed: int) -> RetrievalData:
    """A fixed random subset of ``num_samples`` examples, drawn once (NeMo's ``num_samples``).

    The draw is ``random.Random(seed).sample`` over the example order, as NeMo AutoModel's loader does
    (which indices ``random.sample`` picks depends only on the population size), so the same file and
    seed keep the same examples in both. Asking for more examples than there are keeps all (with a
    warning, as NeMo does).
    """
    if num_samples >= len(data):
        if num_samples > len(data):
            warnings.warn(
                f"{data.source}: num_samples={num_samples} but only {len(data)} examples; using all",
                UserWarning,
                stacklevel=3,
            )
        return data
    picked = random.Random(seed).sample(range(len(data)), num_samples)
    return data.select(picked)


class TrainDataset:
    """A map-style dataset of :class:`TrainItem` (works with ``torch.utils.data.DataLoader``).

    Use a sequential sampler (the dataset already shuffles per epoch) and call :meth:`set_epoch`
    before each epoch. With ``same_dataset_per_batch`` give the global batch size (per device x
    devices) as ``batch_size`` and hand each rank a contiguous slice of every global batch.

    Args:
        datasets: The data, one :class:`RetrievalData` per entry of ``config.datasets``.
        config: Sampling settings (``n_passages``, ``fill_negatives``, weights, ...).
        batch_size: Batch size; only used to group indices when ``same_dataset_per_batch`` is on.
        seed: Used when ``config.seed`` is null (the recipe's top-level seed).

    Raises:
        DataValidationError: when ``fill_negatives`` cannot fill a short negative list (``error``, or
            ``repeat`` for an example with no negatives at all, or a corpus too small to fill from).
    """

    def __init__(
        self,
        datasets: Sequence[RetrievalData],
        config: DataConfig,
        *,
        batch_size: int = 1,
        seed: int | None = None,
    ) -> None:
        if len(datasets) != len(config.datasets):
            raise ValueError(
                f"got {len(datasets)} datasets for {len(config.datasets)} entries in config.datasets"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.datasets = list(datasets)
        self.specs: list[DatasetConfig] = list(config.datasets)
        self.config = config
        self.batch_size = batch_size
        self.seed = data_seed(config, seed)
        self.n_negatives = config.n_passages - 1
        self.epoch = 0
        self._schedule_epoch = -1
        self._schedule: tuple[np.ndarray, np.ndarray] = (np.zeros(0, np.int32), np.zeros(0, np.int64))
        for d, data in enumerate(self.datasets):
            if not len(data):
                raise DataValidationError(
                    [
                        Problem(
                            data.source,
                            None,
                            "(file)",
                            "no usable examples",
                            "add examples or fix the skipped rows",
                        )
                    ]
                )
            self._check_negatives(d, data)
        self._length = len(self._order(0)[0])

    @classmethod
    def from_config(cls, config: DataConfig, *, batch_size: int = 1, seed: int | None = None) -> TrainDataset:
        """Read every dataset of ``config`` and build the sampler over them."""
        return cls(load_datasets(config, seed), config, batch_size=batch_size, seed=seed)

    # ------------------------------------------------------------------ checks
    def _check_negatives(self, d: int, data: RetrievalData) -> None:
        k = self.n_negatives
        if k == 0:
            return
        counts = data.negative_counts()
        short = np.flatnonzero(counts < k)
        if not len(short):
            return
        mode = self.config.fill_negatives
        if mode == "error" or (mode == "repeat" and (counts[short] == 0).any()):
            bad = short if mode == "error" else short[counts[short] == 0]
            fix = (
                "add negatives (e.g. `embedtune mine`), lower n_passages, or set fill_negatives: random"
                if mode == "error"
                else "set fill_negatives: random, or give these examples at least one negative"
            )
            raise DataValidationError(
                [
                    Problem(
                        data.source,
                        int(data.lines[i]) or None,
                        "neg_doc",
                        f"example {data.query_ids[i]!r} has {int(counts[i])} negative(s); n_passages needs {k}",
                        fix,
                    )
                    for i in bad[:1000]
                ],
                len(bad),
            )
        # A short example needs k - negatives documents outside its positives and negatives.
        need = k + int(np.diff(data.pos_offsets)[short].max())
        if mode == "random" and len(data.corpus) < need:
            raise DataValidationError(
                [
                    Problem(
                        data.source,
                        None,
                        "corpus",
                        f"only {len(data.corpus)} documents: too few to fill {k} negatives at random",
                        "lower n_passages or add documents",
                    )
                ]
            )
        how = "random corpus documents" if mode == "random" else "repeats of their own negatives"
        warnings.warn(
            f"{data.source}: {len(short)} of {len(data)} examples have fewer than {k} negatives "
            f"(n_passages={self.config.n_passages}); filling them with {how} (fill_negatives: {mode})",
            UserWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------------ epoch order
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and negatives ``__getitem__`` returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self._length

    def _shares(self) -> list[int]:
        sizes = [len(d) for d in self.datasets]
        total = self.config.samples_per_epoch or sum(sizes)
        if len(sizes) == 1:
            return [total]
        weights = np.array([s.weight for s in self.specs], dtype=np.float64)
        exact = weights / weights.sum() * total
        shares = np.floor(exact).astype(np.int64)
        # Largest remainder: the rounding leftovers go to the datasets that lost the most.
        for j in np.argsort(-(exact - shares), kind="stable")[: total - int(shares.sum())]:
            shares[j] += 1
        return shares.tolist()

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, example) for every index of ``epoch``: a pure function of (seed, epoch)."""
        ds_parts, ex_parts = [], []
        group = self.batch_size if self.config.same_dataset_per_batch else 1
        for d, share in enumerate(self._shares()):
            share = math.ceil(share / group) * group if share else 0
            n = len(self.datasets[d])
            perms = [_rng(self.seed, _ORDER, epoch, d, c).permutation(n) for c in range(math.ceil(share / n))]
            ex = np.concatenate(perms)[:share] if perms else np.zeros(0, np.int64)
            ds_parts.append(np.full(len(ex), d, dtype=np.int32))
            ex_parts.append(ex.astype(np.int64))
        ds, ex = np.concatenate(ds_parts), np.concatenate(ex_parts)
        mix = _rng(self.seed, _MIX, epoch)
        if group == 1:
            if len(self.datasets) > 1:
                p = mix.permutation(len(ds))
                ds, ex = ds[p], ex[p]
        else:
            # Shuffle whole batches so that each batch keeps a single dataset.
            p = mix.permutation(len(ds) // group)
            idx = (p[:, None] * group + np.arange(group)[None, :]).reshape(-1)
            ds, ex = ds[idx], ex[idx]
        return ds, ex

    def _current(self) -> tuple[np.ndarray, np.ndarray]:
        if self._schedule_epoch != self.epoch:
            self._schedule = self._order(self.epoch)
            self._schedule_epoch = self.epoch
        return self._schedule

    # ------------------------------------------------------------------ items
    def __getitem__(self, index: int) -> TrainItem:
        ds, ex = self._current()
        if not 0 <= index < len(ds):
            raise IndexError(f"index {index} out of range for an epoch of {len(ds)}")
        return self.item(int(ds[index]), int(ex[index]), self.epoch)

    def item(self, dataset: int, example: int, epoch: int) -> TrainItem:
        """The item of ``example`` in ``dataset`` at ``epoch`` (pure: same inputs, same item)."""
        data = self.datasets[dataset]
        spec = self.specs[dataset]
        positives = data.positives(example)
        pos = int(positives[epoch % len(positives)] if self.config.cycle_positive_docs else positives[0])
        negs = self.sample_negatives(dataset, example, epoch)
        rows = [pos, *negs]
        texts = data.corpus.texts(rows)
        instr = data.instructions_of(example) if self.config.use_dataset_instruction else Instructions()
        return TrainItem(
            query=data.queries[example],
            passages=tuple(texts),
            doc_ids=tuple(text_hash(t) for t in texts),
            query_instruction=self._joined(
                spec.query_instruction if spec.query_instruction is not None else instr.query
            ),
            passage_instruction=self._joined(
                spec.passage_instruction if spec.passage_instruction is not None else instr.passage
            ),
            dataset=dataset,
            example=example,
            positive_ids=tuple(text_hash(t) for t in data.corpus.texts(positives)),
        )

    def _joined(self, instruction: str | None) -> str | None:
        """The instruction as it is put before the text: with ``instruction_separator`` when non-empty."""
        if instruction:
            return instruction + self.config.instruction_separator
        return instruction

    def sample_negatives(self, dataset: int, example: int, epoch: int) -> list[int]:
        """Corpus rows of the ``n_passages - 1`` negatives of one example at one epoch."""
        k = self.n_negatives
        if k == 0:
            return []
        data = self.datasets[dataset]
        negs = data.negatives(example)
        n = len(negs)
        chosen: list[int] = []
        if n and self.config.negative_selection == "first":
            # NeMo AutoModel's choice: the first k in file order (mined files list the hardest first).
            chosen = [int(x) for x in negs[:k]]
        elif n:
            # Cycles of m epochs: cycle c shuffles the list once (seeded by the example) and epoch j of
            # the cycle takes window j of that shuffle, so every negative is used once per cycle. The
            # last window of a cycle may be short; it is topped up from the next cycle's shuffle.
            step = min(k, n)
            m = math.ceil(n / step)
            cycle, j = divmod(epoch, m)
            perm = _rng(self.seed, _NEG, dataset, example, cycle).permutation(n)
            window = perm[j * step : (j + 1) * step].tolist()
            if len(window) < step:
                extra = _rng(self.seed, _NEG, dataset, example, cycle + 1).permutation(n).tolist()
                window += [x for x in extra if x not in window][: step - len(window)]
            chosen = [int(negs[x]) for x in window]
        if len(chosen) < k:
            if self.config.fill_negatives == "repeat":
                base = list(chosen)
                chosen += [base[t % len(base)] for t in range(k - len(chosen))]
            else:
                chosen += self._random_fill(dataset, example, epoch, k - len(chosen), chosen)
        return chosen

    def _random_fill(
        self, dataset: int, example: int, epoch: int, count: int, chosen: list[int]
    ) -> list[int]:
        data = self.datasets[dataset]
        exclude = set(chosen) | set(data.positives(example).tolist()) | set(data.negatives(example).tolist())
        rng = _rng(self.seed, _FILL, epoch, dataset, example)
        out: list[int] = []
        n = len(data.corpus)
        while len(out) < count:
            for r in rng.integers(0, n, size=2 * count + 8).tolist():
                if r not in exclude:
                    exclude.add(r)
                    out.append(r)
                    if len(out) == count:
                        break
        return out
