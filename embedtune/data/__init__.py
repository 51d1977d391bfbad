"""Retrieval training data: readers with validation, sampling, collation.

Importing this package stays light (no torch, no pyarrow): :mod:`embedtune.data.formats` reads and
validates files, :mod:`embedtune.data.dataset` samples items, :mod:`embedtune.data.collator` builds
batches (torch and transformers are imported when it is called). See ``docs/data.md``. The names below
are imported on first use, so that ``embedtune.data.config`` (read by every recipe check) costs nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from embedtune.data.collator import BiEncoderCollator
    from embedtune.data.config import DataConfig, DatasetConfig
    from embedtune.data.corpus import Corpus
    from embedtune.data.dataset import TrainDataset, TrainItem
    from embedtune.data.formats import BeirSplit, Example, RetrievalData, load_beir, read_training_file
    from embedtune.data.problems import DataValidationError, Problem

# name -> the submodule that defines it
_LAZY = {
    "BiEncoderCollator": "collator",
    "DataConfig": "config",
    "DatasetConfig": "config",
    "Corpus": "corpus",
    "TrainDataset": "dataset",
    "TrainItem": "dataset",
    "BeirSplit": "formats",
    "Example": "formats",
    "RetrievalData": "formats",
    "load_beir": "formats",
    "read_training_file": "formats",
    "DataValidationError": "problems",
    "Problem": "problems",
}

__all__ = [
    "BeirSplit",
    "BiEncoderCollator",
    "Corpus",
    "DataConfig",
    "DataValidationError",
    "DatasetConfig",
    "Example",
    "Problem",
    "RetrievalData",
    "TrainDataset",
    "TrainItem",
    "load_beir",
    "read_training_file",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
