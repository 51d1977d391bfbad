"""How a backbone becomes an embedding model: the settings saved beside it as ``embedtune.json``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from embedtune.errors import ConfigError, ModelLoadError
from embedtune.models.pooling import canonical_pooling

SETTINGS_FILE = "embedtune.json"
FORMAT_VERSION = 1


@dataclass
class EncoderSettings:
    """Everything beyond the backbone's weights that decides what an embedding is."""

    pooling: str = "mean"
    """How token vectors become one vector: mean (avg), cls, last, weighted_mean."""
    normalize: bool = True
    """L2-normalise embeddings, so that the dot product is the cosine."""
    query_prefix: str = ""
    """Text put before every query, e.g. ``"query: "`` or ``"Instruct: {task}\\nQuery: "``."""
    passage_prefix: str = ""
    """Text put before every document, e.g. ``"passage: "``."""
    pool_instruction: bool = True
    """Pool the prefix tokens too. False: they are attended to but left out of pooling."""
    max_length: int = 512
    """Tokens per text (prefix included) at encoding time; longer texts are truncated."""
    padding_side: str = "right"
    """Which side batches are padded on (decoders trained with left padding keep it)."""
    bidirectional: bool = False
    """True when a causal decoder was converted to bidirectional attention."""
    source: dict[str, Any] = field(default_factory=dict)
    """Where the weights came from and how they were converted (for the model card and audits)."""

    def __post_init__(self) -> None:
        self.pooling = canonical_pooling(self.pooling)
        if self.padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side: {self.padding_side!r} is not 'left' or 'right'")
        if int(self.max_length) <= 0:
            raise ConfigError(f"max_length: must be a positive number of tokens, got {self.max_length}")
        self.max_length = int(self.max_length)

    def prefix_for(self, kind: str) -> str:
        """The prefix for ``kind`` ("query" or "document"/"passage")."""
        if kind == "query":
            return self.query_prefix
        if kind in ("document", "passage", "doc"):
            return self.passage_prefix
        raise ValueError(f"kind must be 'query' or 'document', got {kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **asdict(self)}

    def save(self, folder: str | Path) -> None:
        path = Path(folder) / SETTINGS_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, origin: str = SETTINGS_FILE) -> EncoderSettings:
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k != "format_version"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelLoadError(
                f"{origin}: unknown keys {unknown} — this file was written by a newer embedtune; upgrade embedtune"
            )
        return cls(**data)

    @classmethod
    def load(cls, folder: str | Path) -> EncoderSettings | None:
        """Read ``embedtune.json`` from ``folder``; None when there is none."""
        path = Path(folder) / SETTINGS_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ModelLoadError(
                f"{path}:{exc.lineno}: invalid JSON ({exc.msg}) — fix or delete the file"
            ) from exc
        return cls.from_dict(data, origin=str(path))
