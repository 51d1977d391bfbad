"""``MTEBEncoder``: pass an embedtune model to ``mteb`` as is, with per-task instructions.

```python
import mteb
from embedtune.eval.mteb import MTEBEncoder

model = MTEBEncoder.from_pretrained("out/my-model", instructions={
    "SciFact": "Given a scientific claim, retrieve documents that support or refute the claim",
})
mteb.MTEB(tasks=mteb.get_tasks(tasks=["SciFact"])).run(model)
```

mteb calls ``model.encode(sentences, task_name=..., prompt_type=PromptType.query | .document, ...)``.
Queries get the task's instruction (``instruction_template``, default ``"Instruct: {instruction}\\nQuery: "``,
the E5-mistral / NV-Embed form) when one is given, else the model's own query prefix; documents get the
model's passage prefix. ``prompt_type=None`` (symmetric tasks: STS, classification, clustering) uses the
query side, as instruction-tuned embedders do. mteb itself is not a dependency of embedtune.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

DEFAULT_INSTRUCTION_TEMPLATE = "Instruct: {instruction}\nQuery: "


def _flatten(sentences: Any) -> list[str]:
    """A list of texts from a list of strings or from mteb 2's batches (dicts with a ``text`` list)."""
    if isinstance(sentences, str):
        return [sentences]
    out: list[str] = []
    for item in sentences:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, Mapping) and "text" in item:
            texts = item["text"]
            out.extend([texts] if isinstance(texts, str) else list(texts))
        else:
            raise TypeError(f"cannot encode an item of type {type(item).__name__}; pass strings")
    return out


def _prompt_kind(prompt_type: Any) -> str:
    """``"query"`` or ``"document"`` from mteb's ``PromptType`` (an enum or its string value)."""
    value = getattr(prompt_type, "value", prompt_type)
    if value is None:
        return "query"
    value = str(value).lower()
    if value in ("document", "passage", "corpus"):
        return "document"
    if value == "query":
        return "query"
    raise ValueError(f"unknown prompt_type {prompt_type!r}; expected 'query', 'document' or None")


class MTEBEncoder:
    """The ``encode(sentences, task_name=..., prompt_type=...)`` protocol that mteb expects.

    Args:
        encoder: a ``BiEncoder`` (``encode_queries`` / ``encode_documents``).
        instructions: task name -> instruction for its queries.
        instruction_template: how an instruction becomes the query prefix (``{instruction}`` is replaced).
        batch_size: default texts per forward pass (mteb may pass its own ``batch_size``).
        bf16: encode under bfloat16 autocast.
        show_progress: progress bars.
    """

    def __init__(
        self,
        encoder: Any,
        *,
        instructions: Mapping[str, str] | None = None,
        instruction_template: str = DEFAULT_INSTRUCTION_TEMPLATE,
        batch_size: int = 32,
        bf16: bool = False,
        show_progress: bool = False,
    ) -> None:
        if "{instruction}" not in instruction_template:
            raise ValueError("instruction_template must contain '{instruction}'")
        self.encoder = encoder
        self.instructions = dict(instructions or {})
        self.instruction_template = instruction_template
        self.batch_size = batch_size
        self.bf16 = bf16
        self.show_progress = show_progress

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs: Any) -> MTEBEncoder:
        """Load a model with ``AutoBiEncoder.from_pretrained`` and wrap it (kwargs go to ``__init__``)."""
        from embedtune.models.auto import AutoBiEncoder

        return cls(AutoBiEncoder.from_pretrained(name_or_path), **kwargs)

    def query_prefix(self, task_name: str | None) -> str | None:
        """The prefix for a task's queries; None means the model's own query prefix."""
        instruction = self.instructions.get(task_name) if task_name else None
        if instruction is not None:
            return self.instruction_template.format(instruction=instruction)
        return None

    def encode(
        self,
        sentences: Iterable[str] | Any,
        *,
        task_name: str | None = None,
        prompt_type: Any = None,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Embed texts for an mteb task.

        Args:
            sentences: the texts (or mteb 2 batches of ``{"text": [...]}``).
            task_name: the mteb task (picks the instruction); mteb 2's ``task_metadata.name`` works too.
            prompt_type: ``PromptType.query`` / ``PromptType.document`` (or their strings), or None.
            batch_size: texts per forward pass (default: the wrapper's).
            **kwargs: other mteb arguments (ignored).

        Returns:
            (len(sentences), dim) float32 numpy array.
        """
        if task_name is None and kwargs.get("task_metadata") is not None:
            task_name = getattr(kwargs["task_metadata"], "name", None)
        texts = _flatten(sentences)
        if not texts:
            return np.zeros((0, int(getattr(self.encoder, "dim", 0))), dtype=np.float32)
        kw: dict[str, Any] = {
            "batch_size": batch_size or self.batch_size,
            "bf16": self.bf16,
            "show_progress": self.show_progress,
        }
        if _prompt_kind(prompt_type) == "document":
            out = self.encoder.encode_documents(texts, **kw)
        else:
            prefix = self.query_prefix(task_name)
            if prefix is not None:
                kw["prefix"] = prefix
            out = self.encoder.encode_queries(texts, **kw)
        return np.asarray(out, dtype=np.float32)
