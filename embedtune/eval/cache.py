"""On-disk cache of corpus embeddings.

Encoding a corpus is the slow part of an evaluation (minutes on a CPU for SciFact's 5,183 documents),
and re-running an evaluation with the same model and corpus is common (another split, other cut-offs,
a TREC run file). The cache key is a fingerprint of everything that decides a document's embedding:

* the model's weights (every parameter and buffer, bytes included, so a fine-tuned or LoRA model never
  reuses its base model's vectors), its tokenizer, and its settings (pooling, normalisation, prefixes,
  instruction pooling, max length, padding side, bidirectional attention);
* the encoding options (max length override, passage prefix override, bf16);
* the corpus content (``corpus.fingerprint``).

Entries are ``<key>.npy`` (float32, memory-mapped on reuse) plus ``<key>.json`` (what went into the
key), written to a temporary name and renamed so that an interrupted run never leaves a half file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedtune._atomic import atomic_file, write_bytes

# Bump when the meaning of a cached vector changes (e.g. how encoding works), to invalidate old entries.
CACHE_VERSION = 1


def _hash_tensor(h: Any, name: str, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    # Bytes of any dtype (bf16 has no numpy equivalent): view the flat tensor as uint8.
    flat = t.to("cpu").contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().tobytes())


def weights_fingerprint(module: torch.nn.Module) -> str:
    """Hash of every parameter and buffer of ``module`` (names, dtypes, shapes and values).

    Args:
        module: the model.

    Returns:
        A hex digest; equal digests mean bit-identical weights.
    """
    h = hashlib.blake2b(digest_size=20)
    for name, t in module.state_dict().items():
        _hash_tensor(h, name, t)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of a tokenizer's vocabulary, rules and special tokens (a changed tokenizer changes vectors)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        spec = json.loads(backend.to_str())
        # The last call's truncation/padding state is stored in the spec too; it is not part of the rules.
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    elif hasattr(tokenizer, "get_vocab"):
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for attr in ("padding_side", "truncation_side", "model_max_length"):
        h.update(f"{attr}={getattr(tokenizer, attr, None)}".encode())
    special = getattr(tokenizer, "special_tokens_map", None)
    h.update(json.dumps(special, sort_keys=True, default=str).encode())
    return h.hexdigest()


def encoder_fingerprint(encoder: Any) -> dict[str, Any]:
    """Describe everything about ``encoder`` that decides its document embeddings.

    Uses ``encoder.fingerprint()`` when the object has one; otherwise hashes its weights (the module
    itself, or ``encoder.backbone``), tokenizer and ``settings``.

    Returns:
        A JSON-serialisable dict (hashed into the cache key, and saved beside the entry).
    """
    custom = getattr(encoder, "fingerprint", None)
    if callable(custom):
        return {"custom": custom()}
    module = encoder if isinstance(encoder, torch.nn.Module) else getattr(encoder, "backbone", None)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"cannot fingerprint {type(encoder).__name__}: it is not a torch module and has no backbone"
        )
    settings = getattr(encoder, "settings", None)
    if dataclasses.is_dataclass(settings):
        settings_dict = dataclasses.asdict(settings)
        # Where the weights came from is already in their hash; provenance text must not split the cache.
        settings_dict.pop("source", None)
    else:
        settings_dict = {"repr": repr(settings)}
    tokenizer = getattr(encoder, "tokenizer", None)
    return {
        "class": type(encoder).__name__,
        "weights": weights_fingerprint(module),
        "tokenizer": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        "settings": settings_dict,
    }


def corpus_fingerprint(corpus: Any) -> str:
    """The corpus' content hash: ``corpus.fingerprint`` when it has one, else a hash of IDs and texts."""
    fp = getattr(corpus, "fingerprint", None)
    if isinstance(fp, str):
        return fp
    h = hashlib.blake2b(digest_size=20)
    n = len(corpus)
    for i, (doc_id, text) in enumerate(zip(corpus.ids, corpus.texts(range(n)))):
        h.update(f"{i}\x00{doc_id}\x00{text}\x01".encode())
    return h.hexdigest()


def cache_key(description: dict[str, Any]) -> str:
    """Stable hex key of a JSON-serialisable description."""
    blob = json.dumps({"cache_version": CACHE_VERSION, **description}, sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=20).hexdigest()


class EmbeddingCache:
    """A folder of cached embedding matrices.

    Args:
        folder: where entries live (created on first write).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()

    def paths(self, key: str) -> tuple[Path, Path]:
        """The ``.npy`` and ``.json`` paths of ``key``."""
        return self.folder / f"{key}.npy", self.folder / f"{key}.json"

    def load(self, key: str, num_rows: int) -> np.ndarray | None:
        """The cached (num_rows, dim) matrix for ``key`` (memory-mapped), or None when absent or stale."""
        npy, meta = self.paths(key)
        if not (npy.is_file() and meta.is_file()):
            return None
        try:
            arr = np.load(npy, mmap_mode="r")
        except (ValueError, OSError):
            return None  # a damaged entry is just a miss; it is overwritten below
        if arr.ndim != 2 or arr.shape[0] != num_rows:
            return None
        return arr

    def begin(self, key: str, shape: tuple[int, int]) -> PendingEntry:
        """Start an entry written in place (a memory-mapped temporary file), for corpora larger than RAM.

        Fill ``entry.array``, then ``entry.commit(description)``; ``entry.abort()`` on failure.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{key}.npy.", suffix=".tmp")
        os.close(fd)
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        return PendingEntry(self, key, Path(tmp), array)

    def save(self, key: str, embeddings: np.ndarray, description: dict[str, Any]) -> Path:
        """Write an entry atomically; returns the ``.npy`` path."""
        npy, meta = self.paths(key)
        # The vectors first: a description without vectors is a miss, never a wrong hit.
        with atomic_file(npy, "wb") as f:
            np.save(f, np.ascontiguousarray(embeddings, dtype=np.float32))
        write_bytes(meta, _describe(description))
        return npy


def _describe(description: dict[str, Any]) -> bytes:
    return json.dumps(description, indent=2, sort_keys=True, default=str).encode()


class PendingEntry:
    """A cache entry being written (see ``EmbeddingCache.begin``)."""

    def __init__(self, cache: EmbeddingCache, key: str, tmp: Path, array: np.ndarray) -> None:
        self.cache, self.key, self.tmp, self.array = cache, key, tmp, array

    def commit(self, description: dict[str, Any]) -> np.ndarray:
        """Flush, write the description, rename into place; returns the entry memory-mapped read-only."""
        self.array.flush()  # type: ignore[attr-defined]
        del self.array
        npy, meta = self.cache.paths(self.key)
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        # The vectors first: a description without vectors is a miss, never a wrong hit.
        os.replace(self.tmp, npy)
        write_bytes(meta, _describe(description))
        return np.load(npy, mmap_mode="r")

    def abort(self) -> None:
        """Drop the partial file."""
        self.array = None  # type: ignore[assignment]
        self.tmp.unlink(missing_ok=True)


def default_cache_dir() -> Path:
    """``$EMBEDTUNE_CACHE_DIR/embeddings``, else ``~/.cache/embedtune/embeddings`` (beside the corpus cache)."""
    root = os.environ.get("EMBEDTUNE_CACHE_DIR")
    if root:
        return Path(root) / "embeddings"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "embedtune" / "embeddings"
