"""Shared data and writers for the data-layer tests (a uniquely named module, not ``conftest``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The same six examples, written in each layout by the fixtures in conftest.py.
DOCS = {
    "d1": "Transformers use self-attention to relate every token to every other token.",
    "d2": "Recurrent networks process a sequence one step at a time.",
    "d3": "Convolutional networks slide learned filters over images.",
    "d4": "BM25 ranks documents by term frequency and inverse document frequency.",
    "d5": "Dense retrieval embeds queries and documents in one vector space.",
    "d6": "Gradient descent follows the negative gradient of the loss.",
    "d7": "Tokenizers split text into subword units.",
    "d8": "Layer normalisation rescales activations per token.",
}
EXAMPLES = [
    ("q1", "How do transformers relate tokens?", ["d1"], ["d2", "d3", "d6"]),
    ("q2", "What is BM25?", ["d4"], ["d5", "d7"]),
    ("q3", "What is dense retrieval?", ["d5"], ["d4", "d2", "d8", "d1"]),
    ("q4", "How are images processed by CNNs?", ["d3", "d1"], ["d2"]),
    ("q5", "What does a tokenizer do?", ["d7"], ["d8", "d6", "d5"]),
    ("q6", "What is gradient descent?", ["d6"], ["d4", "d3", "d7", "d2", "d8"]),
]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_corpus_folder(folder: Path, docs: dict[str, str], corpus_id: str = "wiki", **instr: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"class": "TextQADataset", "corpus_id": corpus_id, **instr}
    (folder / "merlin_metadata.json").write_text(json.dumps(meta), encoding="utf-8")
    write_jsonl(folder / "docs.jsonl", [{"id": k, "text": v} for k, v in docs.items()])
    return folder
