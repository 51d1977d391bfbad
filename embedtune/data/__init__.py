"""Retrieval training data: readers with validation, sampling, collation.

Importing this package stays light (no torch): :mod:`embedtune.data.formats` reads and validates
files, :mod:`embedtune.data.dataset` samples items, :mod:`embedtune.data.collator` builds batches
(torch and transformers are imported when it is called). See ``docs/data.md``.
"""

from embedtune.data.collator import BiEncoderCollator
from embedtune.data.config import DataConfig, DatasetConfig
from embedtune.data.corpus import Corpus
from embedtune.data.dataset import TrainDataset, TrainItem
from embedtune.data.formats import BeirSplit, Example, RetrievalData, load_beir, read_training_file
from embedtune.data.problems import DataValidationError, Problem

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
