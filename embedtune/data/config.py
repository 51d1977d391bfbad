"""The recipe's ``data:`` block: which files, how many passages per query, lengths, sampling.

Example::

    data:
      datasets:
        - path: data/scifact-mini/train.json          # corpus-ID JSON (NeMo layout)
          weight: 2.0
          query_instruction: "Instruct: Given a claim, find evidence\\nQuery: "
        - path: my_pairs.jsonl                          # inline JSONL
      n_passages: 4            # 1 positive + 3 negatives per query
      q_max_len: 64
      p_max_len: 192
      fill_negatives: random
      same_dataset_per_batch: true
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from embedtune.errors import ConfigError

__all__ = ["DataConfig", "DatasetConfig"]

FILL_NEGATIVES = ("random", "repeat", "error")
NEGATIVE_SELECTION = ("random", "first")
DATA_FORMATS = ("inline", "corpus_id", "beir", "hf")


@dataclass
class DatasetConfig:
    """One training data set in ``data.datasets``."""

    path: str = ""
    """An inline ``.jsonl`` file, a corpus-ID ``.json`` file or a BEIR folder. Required."""
    format: Literal["inline", "corpus_id", "beir", "hf"] | None = None
    """The layout; null chooses from the path (folder with ``corpus.jsonl`` = BEIR, ``.jsonl`` = inline,
    ``.json`` = corpus-ID, ``hf://org/repo/subset`` or a folder of ``dataset_metadata.json`` subsets =
    the Hugging Face retrieval layout)."""
    weight: float = 1.0
    """Mixing weight: this data set's share of each epoch is ``weight / sum(weights)``."""
    num_samples: int | None = None
    """Keep a fixed random subset of this many examples, drawn once at load time (NeMo's
    ``{path, num_samples}`` / ``[num_samples, path]`` entries; the same draw as NeMo's
    ``random.Random(seed).sample``). Null keeps every example. Combines with ``weight``."""
    query_instruction: str | None = None
    """Text put before this data set's queries (overrides the corpus's ``merlin_metadata.json`` and the
    model's ``query_prefix``); null keeps those."""
    passage_instruction: str | None = None
    """Text put before this data set's passages; null keeps the corpus's or the model's."""
    split: str = "train"
    """BEIR only: the ``qrels/<split>.tsv`` to train on."""
    negatives: str | None = None
    """BEIR only: a JSONL file of mined negatives, one ``{"query_id": ..., "neg_doc": [ids]}`` a line."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise ConfigError(
                "path: required — an inline .jsonl file, a corpus-ID .json file or a BEIR folder"
            )
        if self.format is not None and self.format not in DATA_FORMATS:
            raise ConfigError(f"format: {self.format!r} is not one of: {', '.join(DATA_FORMATS)}")
        if self.num_samples is not None and (
            isinstance(self.num_samples, bool)
            or not isinstance(self.num_samples, int)
            or self.num_samples < 1
        ):
            raise ConfigError(f"num_samples: must be an integer >= 1 or null, got {self.num_samples!r}")
        if not isinstance(self.weight, (int, float)) or isinstance(self.weight, bool) or not self.weight > 0:
            raise ConfigError(f"weight: must be a number > 0, got {self.weight!r}")
        if not self.split:
            raise ConfigError("split: must be a qrels split name such as 'train'")


@dataclass
class DataConfig:
    """Training data and how it is sampled and tokenised."""

    datasets: list[Any] = field(default_factory=list)
    """The training data sets (at least one); several are mixed by their weights. An entry is a mapping
    (``{path: ..., weight: ...}``), a bare path, or NeMo's ``[num_samples, path]``."""
    n_passages: int = 4
    """Passages per query: 1 positive + (n_passages - 1) hard negatives."""
    q_max_len: int = 64
    """Maximum tokens per query (instruction included)."""
    p_max_len: int = 256
    """Maximum tokens per passage (instruction included)."""
    pad_to_multiple_of: int | None = 8
    """Pad each batch's length up to a multiple of this (null: no rounding)."""
    fill_negatives: Literal["random", "repeat", "error"] = "random"
    """When an example has fewer than n_passages - 1 negatives: ``random`` fills with random corpus
    documents, ``repeat`` reuses its own negatives, ``error`` stops. One warning counts the examples."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A malformed example or document: ``error`` stops before training listing every problem; ``skip``
    drops the bad rows and warns with the count. Nothing is dropped silently."""
    negative_selection: Literal["random", "first"] = "random"
    """Which of an example's negatives an epoch uses: ``random`` (embedtune's default) rotates through a
    seeded shuffle so every negative is used once per cycle of epochs; ``first`` always takes the first
    n_passages - 1 in file order (NeMo AutoModel's choice: mined files list the hardest first). With
    ``fill_negatives: repeat`` a short list then repeats in order, exactly as NeMo does."""
    cycle_positive_docs: bool = True
    """Epoch ``e`` uses positive ``e mod len(pos_doc)``; false always uses the first positive (NeMo's
    documented default)."""
    use_dataset_instruction: bool = True
    """Put each corpus's ``query_instruction`` / ``passage_instruction`` (``merlin_metadata.json``,
    ``dataset_metadata.json``) before its texts. False ignores them, as NeMo does unless its recipe sets
    ``use_dataset_instruction: true``. A data set's own ``query_instruction`` always applies."""
    instruction_separator: str = ""
    """Text put between a data-set instruction and the text. ``""`` (embedtune's default) concatenates,
    so write instructions with their trailing space or newline; ``" "`` joins as NeMo does
    (``f"{instruction} {question}"``). Only non-empty instructions get it. The model's own
    ``query_prefix`` / ``passage_prefix`` are literal text (the same at training and inference)."""
    same_dataset_per_batch: bool = False
    """Draw every batch from a single data set (in-batch negatives then share a domain)."""
    seed: int | None = None
    """Seed of the sampling (order, negatives, fills); null takes the recipe's top-level ``seed``."""
    pool_instruction: bool | None = None
    """Pool instruction/prefix tokens too; false excludes them from pooling. Null keeps the model's setting."""
    samples_per_epoch: int | None = None
    """Examples per epoch; null: the total size of all data sets."""
    cache_dir: str | None = None
    """Where memory-mapped corpora are cached; null: ``$EMBEDTUNE_CACHE_DIR`` or ``~/.cache/embedtune``."""

    def __post_init__(self) -> None:
        self.datasets = [self._dataset(d, k) for k, d in enumerate(self.datasets or [])]
        if not self.datasets:
            raise ConfigError("datasets: give at least one data set, e.g. [{path: data/train.jsonl}]")
        for name in ("n_passages", "q_max_len", "p_max_len"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (1 if name == "n_passages" else 2)
            ):
                raise ConfigError(
                    f"{name}: must be an integer >= {1 if name == 'n_passages' else 2}, got {value!r}"
                )
        if self.pad_to_multiple_of is not None and (
            isinstance(self.pad_to_multiple_of, bool)
            or not isinstance(self.pad_to_multiple_of, int)
            or self.pad_to_multiple_of < 1
        ):
            raise ConfigError(
                f"pad_to_multiple_of: must be an integer >= 1 or null, got {self.pad_to_multiple_of!r}"
            )
        if self.pad_to_multiple_of:
            # transformers refuses to truncate to a length that padding would then round up.
            for name in ("q_max_len", "p_max_len"):
                value = getattr(self, name)
                if value % self.pad_to_multiple_of:
                    up = -(-value // self.pad_to_multiple_of) * self.pad_to_multiple_of
                    raise ConfigError(
                        f"{name}: {value} is not a multiple of pad_to_multiple_of ({self.pad_to_multiple_of}) — "
                        f"use {up}, or set pad_to_multiple_of: null"
                    )
        if self.fill_negatives not in FILL_NEGATIVES:
            raise ConfigError(
                f"fill_negatives: {self.fill_negatives!r} is not one of: {', '.join(FILL_NEGATIVES)}"
            )
        if self.negative_selection not in NEGATIVE_SELECTION:
            raise ConfigError(
                f"negative_selection: {self.negative_selection!r} is not one of: {', '.join(NEGATIVE_SELECTION)}"
            )
        if not isinstance(self.instruction_separator, str):
            raise ConfigError(
                f"instruction_separator: must be a string such as '' or ' ', got {self.instruction_separator!r}"
            )
        if self.on_bad_row not in ("error", "skip"):
            raise ConfigError(f"on_bad_row: {self.on_bad_row!r} is not one of: error, skip")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"seed: must be an integer or null, got {self.seed!r}")
        if self.samples_per_epoch is not None and (
            isinstance(self.samples_per_epoch, bool)
            or not isinstance(self.samples_per_epoch, int)
            or self.samples_per_epoch < 1
        ):
            raise ConfigError(
                f"samples_per_epoch: must be an integer >= 1 or null, got {self.samples_per_epoch!r}"
            )

    @staticmethod
    def _dataset(value: Any, k: int) -> DatasetConfig:
        # The YAML loader builds DatasetConfig itself; code may pass a dict or a bare path too.
        if isinstance(value, DatasetConfig):
            return value
        try:
            if isinstance(value, str):
                return DatasetConfig(path=value)
            if (
                isinstance(value, (list, tuple))
                and len(value) == 2
                and isinstance(value[0], int)
                and not isinstance(value[0], bool)
                and isinstance(value[1], str)
            ):
                return DatasetConfig(path=value[1], num_samples=value[0])  # NeMo's [num_samples, path]
            if isinstance(value, dict):
                from embedtune.config import _build_dataclass  # the loader's checks: key paths, types

                return _build_dataclass(DatasetConfig, value, "")
        except ConfigError as exc:
            raise ConfigError(f"datasets[{k}].{exc}") from None
        except TypeError as exc:
            raise ConfigError(f"datasets[{k}]: {exc}") from None
        raise ConfigError(
            f"datasets[{k}]: expected a mapping such as {{path: data/train.jsonl}} (or [num_samples, path]), "
            f"got {value!r}"
        )
