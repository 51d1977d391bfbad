"""``OnnxBiEncoder``: encode texts with an ONNX export, through the same API as ``BiEncoder``.

An export folder holds ``model.onnx`` (token ids → pooled, normalised embeddings), the tokenizer and
``embedtune.json``. Tokenisation is shared with the PyTorch model (:func:`tokenize_texts`), so the
prefixes, truncation, padding side and instruction mask are exactly those the model was trained with;
only the network runs in ONNX Runtime. No torch model is built: loading takes well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedtune.errors import EmbedtuneError, ModelLoadError
from embedtune.export.errors import require_onnx
from embedtune.models.encoding import encode_in_batches, encode_label
from embedtune.models.settings import SETTINGS_FILE, EncoderSettings
from embedtune.models.tokenization import ensure_pad_token

ONNX_FILE = "model.onnx"
BACKENDS = ("torch", "onnx")


def is_onnx_export(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder written by ``embedtune export onnx``."""
    folder = Path(path)
    return (folder / ONNX_FILE).is_file() and (folder / SETTINGS_FILE).is_file()


class OnnxBiEncoder:
    """A bi-encoder whose network runs in ONNX Runtime.

    Drop-in for :class:`~embedtune.BiEncoder` at inference: ``encode``, ``encode_queries``,
    ``encode_documents``, ``tokenize``, ``settings``, ``tokenizer`` and ``dim`` behave the same, and
    calling it on a tokenised batch returns the embeddings. ``bf16`` is accepted and ignored (the
    precision is fixed at export: fp32, fp16 or int8).

    Args:
        session: an ``onnxruntime.InferenceSession`` of an embedtune export.
        tokenizer: the tokenizer saved beside it.
        settings: the saved ``embedtune.json``.
        path: the export folder (for ``fingerprint`` and messages).
    """

    def __init__(self, session: Any, tokenizer: Any, settings: EncoderSettings, path: Path | None = None):
        self.session = session
        self.tokenizer = tokenizer
        self.settings = settings
        self.path = path
        self.input_names: tuple[str, ...] = tuple(i.name for i in session.get_inputs())
        missing = {"input_ids", "attention_mask"} - set(self.input_names)
        if missing:
            raise ModelLoadError(
                f"{path or 'the ONNX model'}: inputs {sorted(self.input_names)} lack {sorted(missing)} — "
                "not an embedtune export; export it with `embedtune export onnx`"
            )
        ensure_pad_token(tokenizer, str(path))
        tokenizer.padding_side = settings.padding_side
        self._fingerprint: str | None = None

    # ----------------------------------------------------------------------------------------- load
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        max_length: int | None = None,
        padding_side: str | None = None,
        providers: Sequence[str] | None = None,
        num_threads: int | None = None,
    ) -> OnnxBiEncoder:
        """Load an export folder.

        Args:
            path: the folder written by ``embedtune export onnx`` (or its ``model.onnx``).
            max_length: override the saved number of tokens per text.
            padding_side: override the saved padding side (the graph handles either).
            providers: ONNX Runtime execution providers; default CPU.
            num_threads: intra-op threads; default ONNX Runtime's choice (all cores).

        Raises:
            ModelLoadError: the folder is not an ONNX export.
            MissingExtraError: onnxruntime is not installed.
        """
        require_onnx(runtime_only=True)
        import onnxruntime as ort
        from transformers import AutoTokenizer

        folder = Path(path).expanduser()
        if folder.is_file() and folder.suffix == ".onnx":
            folder = folder.parent
        if not folder.is_dir():
            raise ModelLoadError(
                f"{folder}: no such folder — give the folder written by `embedtune export onnx`"
            )
        if not is_onnx_export(folder):
            hint = (
                " (it holds a PyTorch model: use --backend torch, or export it first with "
                f"`embedtune export onnx --model {folder} --output DIR`)"
                if (folder / "config.json").is_file()
                else ""
            )
            raise ModelLoadError(
                f"{folder}: not an ONNX export — it needs {ONNX_FILE} and {SETTINGS_FILE}{hint}"
            )
        settings = EncoderSettings.load(folder)
        assert settings is not None  # is_onnx_export checked the file
        overrides = {"max_length": max_length, "padding_side": padding_side}
        if any(v is not None for v in overrides.values()):
            values = {**settings.__dict__, **{k: v for k, v in overrides.items() if v is not None}}
            settings = EncoderSettings(**values)
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = int(num_threads)
        session = ort.InferenceSession(
            str(folder / ONNX_FILE), options, providers=list(providers or ["CPUExecutionProvider"])
        )
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return cls(session, tokenizer, settings, folder)

    # ---------------------------------------------------------------------------------------- basics
    @property
    def dim(self) -> int:
        """Size of the embeddings."""
        shape = self.session.get_outputs()[0].shape
        if isinstance(shape[-1], int):
            return int(shape[-1])
        return int(self.settings.source.get("onnx", {}).get("dim", 0))

    def fingerprint(self) -> str:
        """A hash of the graph, its external weights and ``embedtune.json`` (for embedding caches)."""
        if self._fingerprint is None:
            if self.path is None:
                raise EmbedtuneError("fingerprint: this OnnxBiEncoder was not loaded from a folder")
            h = hashlib.sha256()
            for f in sorted(self.path.iterdir()):
                if f.is_file() and (f.name.startswith("model.onnx") or f.name == SETTINGS_FILE):
                    h.update(f.name.encode())
                    with f.open("rb") as fh:
                        for block in iter(lambda: fh.read(1 << 20), b""):
                            h.update(block)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any,
        pooling_mask: Any | None = None,
    ) -> np.ndarray:
        """Embed a tokenised batch (numpy arrays or torch tensors, (batch, seq)) -> (batch, dim) float32."""
        feeds = {"input_ids": _int64(input_ids), "attention_mask": _int64(attention_mask)}
        if "pooling_mask" in self.input_names:
            feeds["pooling_mask"] = _int64(attention_mask if pooling_mask is None else pooling_mask)
        (embeddings,) = self.session.run(["embeddings"], feeds)
        return np.asarray(embeddings, dtype=np.float32)

    def tokenize(
        self,
        texts: Sequence[str],
        kind: str = "document",
        *,
        max_length: int | None = None,
        prefix: str | Sequence[str] | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> dict[str, Any]:
        """Tokenise as ``BiEncoder.tokenize`` does; returns input_ids, attention_mask, pooling_mask."""
        from embedtune.models.tokenization import tokenize_texts

        return tokenize_texts(
            self.tokenizer,
            texts,
            prefixes=self.settings.prefix_for(kind) if prefix is None else prefix,
            max_length=max_length or self.settings.max_length,
            pool_prefix=self.settings.pool_instruction,
            pad_to_multiple_of=pad_to_multiple_of,
        )

    # ---------------------------------------------------------------------------------------- encode
    def encode(
        self,
        texts: Sequence[str],
        kind: str = "document",
        *,
        batch_size: int = 32,
        max_length: int | None = None,
        prefix: str | Sequence[str] | None = None,
        bf16: bool = False,
        show_progress: bool | None = None,
        convert_to_numpy: bool = True,
    ) -> Any:
        """Embed texts in length-sorted batches; the output keeps the input order.

        Args:
            texts: the texts (a list, not a single string).
            kind: "query" or "document"; picks the prefix.
            batch_size: texts per ONNX Runtime call.
            max_length: tokens per text; default ``settings.max_length``.
            prefix: override the prefix (one for all, or one per text).
            bf16: ignored (kept for drop-in compatibility with ``BiEncoder.encode``).
            show_progress: progress bar; default on for more than 512 texts.
            convert_to_numpy: numpy float32 array (default) or a torch tensor.

        Returns:
            (len(texts), dim) embeddings.
        """
        del bf16  # the precision of an export is fixed when it is written

        def embed_batch(batch: list[str], batch_prefix: str | list[str] | None) -> np.ndarray:
            return self(**self.tokenize(batch, kind, max_length=max_length, prefix=batch_prefix))

        out = encode_in_batches(
            texts,
            embed_batch,
            batch_size=batch_size,
            prefix=prefix,
            show_progress=show_progress,
            desc=f"{encode_label(kind)} (onnx)",
        )
        if convert_to_numpy:
            return out
        import torch

        return torch.from_numpy(out)

    def encode_queries(self, texts: Sequence[str], **kwargs: Any) -> Any:
        """Embed queries (with the query prefix). See :meth:`encode` for the options."""
        return self.encode(texts, "query", **kwargs)

    def encode_documents(self, texts: Sequence[str], **kwargs: Any) -> Any:
        """Embed documents (with the passage prefix). See :meth:`encode` for the options."""
        return self.encode(texts, "document", **kwargs)

    def eval(self) -> OnnxBiEncoder:
        """No-op (an ONNX graph has no training mode); returns self, as ``nn.Module.eval`` does."""
        return self

    def __repr__(self) -> str:
        s = self.settings
        onnx_info = s.source.get("onnx", {})
        return (
            f"OnnxBiEncoder(path={self.path}, pooling={s.pooling}, normalize={s.normalize}, "
            f"dtype={onnx_info.get('dtype', '?')}, quantize={onnx_info.get('quantize')})"
        )


def _int64(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.int64)


def load_encoder(path: str | os.PathLike[str], backend: str = "torch", **kwargs: Any) -> Any:
    """Load a bi-encoder for inference with the backend asked for.

    Args:
        path: for ``torch``, anything ``AutoBiEncoder.from_pretrained`` takes; for ``onnx``, an export
            folder written by ``embedtune export onnx``.
        backend: "torch" (a :class:`~embedtune.BiEncoder`), "onnx" (an :class:`OnnxBiEncoder`), or
            "auto": onnx for an export folder, torch for anything else.
        **kwargs: passed to the loader (``max_length``, ``padding_side``; torch also takes the
            ``AutoBiEncoder.from_pretrained`` options, onnx ``providers`` and ``num_threads``). A
            ``device`` option is honoured by torch; for onnx, "cuda" selects the CUDA provider.

    Raises:
        EmbedtuneError: an unknown backend, or a path the backend cannot load (the message says which
            backend fits the folder).
    """
    if backend not in (*BACKENDS, "auto"):
        raise EmbedtuneError(f"backend: unknown {backend!r} — use one of {', '.join(BACKENDS)} or auto")
    if backend == "auto":
        backend = "onnx" if is_onnx_export(path) and not (Path(path) / "config.json").is_file() else "torch"
    if backend == "onnx":
        device = kwargs.pop("device", None)
        if device is not None and str(device).startswith("cuda") and "providers" not in kwargs:
            kwargs["providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return OnnxBiEncoder.from_pretrained(path, **kwargs)
    if is_onnx_export(path) and not (Path(path) / "config.json").is_file():
        raise ModelLoadError(f"{path}: this is an ONNX export — load it with backend='onnx' (--backend onnx)")
    from embedtune.models.auto import AutoBiEncoder

    return AutoBiEncoder.from_pretrained(path, **kwargs)


def read_export_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The export details (dtype, quantisation, opset, verification) saved in ``embedtune.json``."""
    data = json.loads((Path(path) / SETTINGS_FILE).read_text(encoding="utf-8"))
    return dict(data.get("source", {}).get("onnx", {}))
