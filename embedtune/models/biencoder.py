"""``BiEncoder``: a backbone, a tokenizer and the settings that turn token vectors into embeddings.

Queries and documents are embedded independently by the same network; they differ only in their
prefix (``"query: "`` / ``"passage: "`` or an instruction). ``forward`` is what training calls on
tokenised batches; ``encode_queries`` / ``encode_documents`` are the inference API.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from embedtune.errors import ConfigError, EmbedtuneError
from embedtune.models.encoding import check_texts, encode_in_batches, encode_label, token_lengths
from embedtune.models.pooling import pool
from embedtune.models.settings import EncoderSettings
from embedtune.models.tokenization import tokenize_texts


def freeze_unused_pooler(backbone: nn.Module) -> list[str]:
    """Stop training the backbone's own pooler head (BERT-family ``pooler``: dense + tanh on [CLS]).

    A bi-encoder pools ``last_hidden_state`` itself, so these weights never get a gradient; left
    trainable, DistributedDataParallel fails at its second step ("Expected to have finished reduction
    in the prior iteration") because it waits for their gradients. Their values are kept and saved
    unchanged (as single-process training leaves them). Call again after adding LoRA adapters.

    Returns:
        The names of the parameters frozen now.
    """
    frozen = []
    for name, param in backbone.named_parameters():
        if "pooler" in name.split(".") and param.requires_grad:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def attention_dropout_slots(model: nn.Module) -> Iterator[tuple[nn.Module, str]]:
    """Every attention layer of ``model`` with its attention-probability dropout, as (module, attribute):
    ``"dropout"`` (an ``nn.Dropout`` on a ``*SelfAttention`` / ``*CrossAttention`` module: BERT and its
    kin) or ``"attention_dropout"`` (a float on an ``*Attention`` module: Llama, Mistral, ModernBERT)."""
    for module in model.modules():
        name = type(module).__name__
        if name.endswith(("SelfAttention", "CrossAttention")) and isinstance(
            getattr(module, "dropout", None), nn.Dropout
        ):
            yield module, "dropout"
        elif "Attention" in name and isinstance(getattr(module, "attention_dropout", None), float):
            yield module, "attention_dropout"


#: Config keys that hold a model's attention-probability dropout, by model family.
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")


def set_attention_dropout(backbone: nn.Module, p: float) -> float | None:
    """Set the dropout on attention probabilities of every attention layer of ``backbone`` to ``p``.

    This is the dropout inside attention (softmax(QK^T) → dropout → ·V), not the dropout on hidden
    states, which stays as the model has it. Only the running modules change: the config, and so the
    saved ``config.json``, keeps the checkpoint's value. Handles the layouts of transformers' models:
    an ``nn.Dropout`` named ``dropout`` on a ``*SelfAttention`` / ``*CrossAttention`` module (BERT,
    RoBERTa, XLM-R, MPNet, DistilBERT and their kin) or a float ``attention_dropout`` on an
    ``*Attention`` module (Llama, Mistral, Qwen, ModernBERT, embedtune's bidirectional models).

    Why: PyTorch's fused attention kernels have no dropout on CPU, so a dropout above 0 in training
    sends every layer to the unfused path that builds the (L x L) probabilities, draws a random mask
    for them and keeps both for the backward pass (measured: 6x slower per layer at 256 tokens).

    Returns:
        The config's value before (None when the config names none).

    Raises:
        ConfigError: no attention layer of ``backbone`` was found to set, although its config has an
            attention dropout above 0 (or names none).
    """
    if not 0 <= p < 1:
        raise ConfigError(f"model.attention_dropout: must be in [0, 1), got {p}")
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    config = getattr(base, "config", None)
    before = next((float(getattr(config, k)) for k in ATTENTION_DROPOUT_KEYS if hasattr(config, k)), None)
    changed = 0
    for module, attr in attention_dropout_slots(base):
        if attr == "dropout":
            module.dropout.p = p
        else:
            module.attention_dropout = p
        changed += 1
    if not changed and (before is None or before > 0):
        model_type = getattr(config, "model_type", type(base).__name__)
        raise ConfigError(
            f"model.attention_dropout: found no attention layer to set in this {model_type!r} model "
            f"(its config's attention dropout: {before}); leave model.attention_dropout null to train with "
            "the model's own"
        )
    return before


class BiEncoder(nn.Module):
    """An embedding model: ``backbone`` → pooling → optional L2 normalisation.

    Args:
        backbone: a transformers model returning ``last_hidden_state`` (possibly wrapped by PEFT).
        tokenizer: its tokenizer; a pad token must be set.
        settings: pooling, normalisation, prefixes and lengths.
    """

    def __init__(self, backbone: nn.Module, tokenizer: PreTrainedTokenizerBase, settings: EncoderSettings):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.settings = settings
        if tokenizer.pad_token is None:
            raise EmbedtuneError(
                "the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)"
            )
        tokenizer.padding_side = settings.padding_side
        freeze_unused_pooler(backbone)

    # ----------------------------------------------------------------------------------------- basics
    @property
    def config(self) -> Any:
        """The backbone's transformers config."""
        return self.base_model.config

    @property
    def base_model(self) -> nn.Module:
        """The transformers model under any PEFT wrapper."""
        backbone = self.backbone
        if hasattr(backbone, "get_base_model"):
            return backbone.get_base_model()
        return backbone

    @property
    def dim(self) -> int:
        """Size of the embeddings."""
        return int(self.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pooling_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embed a tokenised batch.

        Args:
            input_ids: (batch, seq) token ids.
            attention_mask: (batch, seq) 1 for real tokens.
            pooling_mask: (batch, seq) tokens to pool (instruction tokens may be 0); default: attention_mask.

        Returns:
            (batch, dim) float32 embeddings, L2-normalised when ``settings.normalize``.
        """
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (b, s, h)
        # Pool in float32: bf16 sums over hundreds of tokens lose precision.
        emb = pool(hidden.float(), attention_mask, self.settings.pooling, pooling_mask)  # (b, h)
        if self.settings.normalize:
            emb = F.normalize(emb, p=2, dim=-1)
        return emb

    def gradient_checkpointing_enable(self) -> None:
        """Trade compute for memory in training (recompute activations in the backward pass)."""
        base = self.base_model
        kwargs = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # ------------------------------------------------------------------------------------- tokenise
    def tokenize(
        self,
        texts: Sequence[str],
        kind: str = "document",
        *,
        max_length: int | None = None,
        prefix: str | Sequence[str] | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Tokenise texts with the prefix for ``kind``; returns input_ids, attention_mask, pooling_mask."""
        return tokenize_texts(
            self.tokenizer,
            texts,
            prefixes=self.settings.prefix_for(kind) if prefix is None else prefix,
            max_length=max_length or self.settings.max_length,
            pool_prefix=self.settings.pool_instruction,
            pad_to_multiple_of=pad_to_multiple_of,
        )

    # --------------------------------------------------------------------------------------- encode
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
    ) -> np.ndarray | torch.Tensor:
        """Embed texts in length-sorted batches without gradients; the output keeps the input order.

        Args:
            texts: the texts (a list, not a single string).
            kind: "query" or "document"; picks the prefix.
            batch_size: texts per forward pass.
            max_length: tokens per text; default ``settings.max_length``.
            prefix: override the prefix (one for all, or one per text).
            bf16: run the backbone under bfloat16 autocast (2-3x faster on CPUs with AMX).
            show_progress: progress bar; default on for more than 512 texts.
            convert_to_numpy: numpy float32 array (default) or a CPU torch tensor.

        Returns:
            (len(texts), dim) embeddings.
        """
        device = self.device
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        if device.type == "cpu":
            from embedtune._malloc import keep_freed_memory

            keep_freed_memory()  # every batch reallocates the same activations: keep them mapped

        def embed_batch(batch: list[str], batch_prefix: str | list[str] | None) -> np.ndarray:
            feats = self.tokenize(batch, kind, max_length=max_length, prefix=batch_prefix)
            feats = {k: v.to(device) for k, v in feats.items()}
            return self(**feats).float().cpu().numpy()

        # Sort by tokens, not characters: batches of equal token counts carry less padding.
        texts, prefixes = check_texts(texts, prefix)
        lengths = token_lengths(
            self.tokenizer,
            texts,
            self.settings.prefix_for(kind) if prefix is None else (prefix if prefixes is None else prefixes),
            max_length=max_length or self.settings.max_length,
        )
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode(), autocast:
                out = encode_in_batches(
                    texts,
                    embed_batch,
                    batch_size=batch_size,
                    prefix=prefix,
                    show_progress=show_progress,
                    desc=encode_label(kind),
                    lengths=lengths,
                )
        finally:
            self.train(was_training)
        return out if convert_to_numpy else torch.from_numpy(out)

    def encode_queries(self, texts: Sequence[str], **kwargs: Any) -> np.ndarray | torch.Tensor:
        """Embed queries (with the query prefix). See :meth:`encode` for the options."""
        return self.encode(texts, "query", **kwargs)

    def encode_documents(self, texts: Sequence[str], **kwargs: Any) -> np.ndarray | torch.Tensor:
        """Embed documents (with the passage prefix). See :meth:`encode` for the options."""
        return self.encode(texts, "document", **kwargs)

    # ----------------------------------------------------------------------------------------- save
    def save_pretrained(self, path: str | Path, *, merge_lora: bool = True, dtype: str = "float32") -> Path:
        """Write the model so that embedtune, plain transformers and sentence-transformers all load it.

        The folder holds safetensors weights and ``config.json`` (for a converted decoder: the stock
        model_type with ``is_causal: false``), the tokenizer, the sentence-transformers layout
        (``modules.json``, ``1_Pooling``, ``2_Normalize``, prompts) and ``embedtune.json``. A LoRA model
        is merged into its base weights (``merge_lora=True``), or saved as a PEFT adapter. Weights are
        saved in float32 (``dtype``: "float32", or opt-in "bfloat16"/"float16", or "auto" to keep them).

        Returns:
            The folder.
        """
        from embedtune.models import saving

        return saving.save_biencoder(self, Path(path), merge_lora=merge_lora, dtype=dtype)

    def extra_repr(self) -> str:
        s = self.settings
        return (
            f"pooling={s.pooling}, normalize={s.normalize}, bidirectional={s.bidirectional}, dim={self.dim}"
        )
