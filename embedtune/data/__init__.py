"""Retrieval training data: readers with validation, sampling, collation.

Importing this package stays light (no torch); see :mod:`embedtune.data.formats` for the readers,
:mod:`embedtune.data.dataset` for sampling and :mod:`embedtune.data.collator` for batches.
"""

from embedtune.data.corpus import Corpus
from embedtune.data.formats import BeirSplit, Example, RetrievalData, load_beir, read_training_file
from embedtune.data.problems import DataValidationError, Problem

__all__ = [
    "BeirSplit",
    "Corpus",
    "DataValidationError",
    "Example",
    "Problem",
    "RetrievalData",
    "load_beir",
    "read_training_file",
]
