"""The error types users see.

Every problem caused by user input (a bad file, a wrong option, a model that cannot be converted) is
raised as one of these, with a message that names the file/line/field where it applies and says how to
fix it. ``assert`` is reserved for internal invariants.
"""

from __future__ import annotations


class EmbedtuneError(ValueError):
    """Base class for every user-facing error raised by embedtune."""


class ConfigError(EmbedtuneError):
    """A recipe or option is invalid (unknown key, wrong type, bad value)."""


class DataError(EmbedtuneError):
    """A data file is malformed or inconsistent."""


class ModelLoadError(EmbedtuneError):
    """A model path or name cannot be loaded as a bi-encoder."""


class BidirectionalityError(EmbedtuneError):
    """A model that should attend bidirectionally still attends causally (or cannot be converted)."""
