"""Turn a decoder-only transformer into a bidirectional encoder, and prove that it worked.

transformers (>= 5) builds attention masks in ``masking_utils``; when ``config.is_causal`` is False,
``create_causal_mask`` returns a *bidirectional* padding mask instead. That is the one switch we use:
we change the model instance (its config and its attention modules' ``is_causal`` flags), never a
module-level function, so nothing else in the process is affected.

Flags can silently stop working after a library upgrade (a NeMo AutoModel bug report), so every converted
model is checked by :func:`verify_bidirectional`: a probe of a few tokens that fails loudly if a late
token cannot influence an early one, or if a padding token influences a real one.
"""

from __future__ import annotations

import torch
from torch import nn

from embedtune.errors import BidirectionalityError

# Decoder families whose attention honours ``config.is_causal = False`` in transformers 5.x
# (checked by the bidirectionality tests). Others may work too: the probe decides.
KNOWN_CONVERTIBLE: frozenset[str] = frozenset(
    {
        "llama",
        "mistral",
        "ministral",
        "ministral3",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi3",
        "olmo2",
        "granite",
        "smollm3",
    }
)


NO_WINDOW = 1 << 30
"""A sliding window no input reaches, for configs whose sliding layers must keep their layer type."""


def _layer_type_rope(config: object) -> bool:
    """True when RoPE differs per layer type (Gemma 3: local layers use another base than global ones).

    Renaming such a model's ``sliding_attention`` layers to ``full_attention`` would change the
    positions its local layers were trained with, so their type stays and only their window goes.
    """
    rope = getattr(config, "rope_parameters", None)
    return isinstance(rope, dict) and isinstance(rope.get("sliding_attention"), dict)


def _config_without_window(config: object) -> None:
    config.is_causal = False  # type: ignore[attr-defined]
    if hasattr(config, "use_sliding_window"):
        config.use_sliding_window = False  # type: ignore[attr-defined]
    layer_types = getattr(config, "layer_types", None)
    sliding = bool(layer_types) and "sliding_attention" in layer_types
    if sliding and _layer_type_rope(config):
        # Keep the layer types (and their RoPE); the masks of the "sliding" layers become full.
        config.sliding_window = NO_WINDOW  # type: ignore[attr-defined]
        return
    if getattr(config, "sliding_window", None) is not None:
        config.sliding_window = None  # type: ignore[attr-defined]
    if sliding:
        config.layer_types = ["full_attention" if t == "sliding_attention" else t for t in layer_types]  # type: ignore[attr-defined]


def make_bidirectional(model: nn.Module) -> nn.Module:
    """Switch ``model`` (in place) to bidirectional attention, with no sliding window, and return it.

    Sets ``config.is_causal = False`` (read by transformers' mask builders) on the model's config and
    sub-configs, and ``is_causal = False`` on every attention module (read by the SDPA/flash kernels
    when no mask is materialised). Sliding windows are switched off: an encoder attends to its whole
    input, and a two-sided 4096 window is never what a user meant. Configs are not enough for that:
    Qwen2/Qwen3/Gemma attention modules copy ``config.sliding_window`` at init and hand *their* copy to
    the flash-attention kernel, and Qwen2-style models decide at init whether to build sliding masks
    (``has_sliding_layers``); so the window is also removed from every module of this instance (no
    class or function is patched). Models whose RoPE depends on the layer type (Gemma 3) keep their
    layer types, with a window no input reaches (:data:`NO_WINDOW`) for the mask builders.
    """
    configs = [model.config] if hasattr(model, "config") else []
    for config in list(configs):
        sub = getattr(config, "text_config", None)
        if sub is not None and sub is not config:
            configs.append(sub)
    for config in configs:
        _config_without_window(config)
    for module in model.modules():
        if hasattr(module, "is_causal") and isinstance(module.is_causal, bool):
            module.is_causal = False
        if isinstance(getattr(module, "sliding_window", None), int):
            module.sliding_window = None  # what flash_attention_2 reads (attention modules)
        if isinstance(getattr(module, "is_sliding", None), bool):
            module.is_sliding = False
        if isinstance(getattr(module, "has_sliding_layers", None), bool):
            types = getattr(getattr(module, "config", None), "layer_types", None) or ()
            module.has_sliding_layers = "sliding_attention" in types
    return model


def attention_windows(model: nn.Module) -> dict[str, int | None]:
    """The sliding window every attention module of ``model`` would hand to its kernel (None = full).

    Modules that keep no copy read the config at each call (Mistral, Ministral 3): theirs is the
    config's window. Used by tests and the GPU check to prove that no window is left anywhere.
    """
    out: dict[str, int | None] = {}
    for name, module in model.named_modules():
        if not (hasattr(module, "is_causal") and hasattr(module, "q_proj")):
            continue  # not an attention module
        if hasattr(module, "sliding_window"):
            out[name] = module.sliding_window
        else:
            out[name] = getattr(getattr(module, "config", None), "sliding_window", None)
    return out


def _probe_ids(model: nn.Module, seq_len: int, seed: int) -> torch.Tensor:
    vocab = int(getattr(model.config, "vocab_size", 1000) or 1000)
    g = torch.Generator().manual_seed(seed)
    # Stay away from the first ids (often special tokens) so the probe sees ordinary tokens.
    low = min(10, vocab - 2)
    return torch.randint(low, vocab, (1, seq_len), generator=g)


def _hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden.float().cpu()  # (b, s, h)


def _changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    # A causal model gives bit-identical early outputs; a bidirectional one moves them clearly.
    scale = max(1.0, float(a.abs().max()))
    return float((a - b).abs().max()) > 1e-5 * scale


@torch.no_grad()
def attends_to_future(model: nn.Module, *, seq_len: int = 6, seed: int = 0) -> bool:
    """True when changing the last token of a short input changes the first token's output."""
    was_training = model.training
    model.eval()
    try:
        ids = _probe_ids(model, seq_len, seed)
        changed_ids = ids.clone()
        vocab = int(getattr(model.config, "vocab_size", 1000) or 1000)
        changed_ids[0, -1] = (changed_ids[0, -1] + 1 - 10) % (vocab - 10) + 10
        mask = torch.ones_like(ids)
        return _changed(_hidden(model, ids, mask)[0, 0], _hidden(model, changed_ids, mask)[0, 0])
    finally:
        model.train(was_training)


@torch.no_grad()
def verify_bidirectional(model: nn.Module, *, seq_len: int = 6, seed: int = 0) -> None:
    """Prove that ``model`` attends bidirectionally and ignores padding; raise otherwise.

    Three probes on a few random tokens (milliseconds for small models):
    1. unpadded: changing the last token changes the first token's output;
    2. right-padded batch: the same, for the last *real* token, with a padded row beside it;
    3. padding: changing the id under a padded position changes no real token's output.

    Raises:
        BidirectionalityError: naming the probe that failed and the likely cause.
    """
    was_training = model.training
    model.eval()
    try:
        vocab = int(getattr(model.config, "vocab_size", 1000) or 1000)
        ids = _probe_ids(model, seq_len, seed)  # (1, s)
        bump = ids.clone()
        bump[0, -1] = (bump[0, -1] + 1 - 10) % (vocab - 10) + 10
        ones = torch.ones_like(ids)
        if not _changed(_hidden(model, ids, ones)[0, 0], _hidden(model, bump, ones)[0, 0]):
            raise BidirectionalityError(
                f"{type(model).__name__} still attends causally: changing the last token did not change the "
                "first token's output. The model's attention ignores config.is_causal=False (an unsupported "
                "architecture or transformers version). Load it with bidirectional=False to keep causal "
                "attention (use pooling='last'), or open an issue naming the model type "
                f"{getattr(model.config, 'model_type', '?')!r}."
            )
        # A batch of two: row 0 padded on the right by two positions, row 1 full length.
        batch = torch.cat([ids, ids], dim=0)
        mask = torch.ones_like(batch)
        mask[0, -2:] = 0
        bumped = batch.clone()
        bumped[0, -3] = (bumped[0, -3] + 1 - 10) % (vocab - 10) + 10  # row 0's last real token
        if not _changed(_hidden(model, batch, mask)[0, 0], _hidden(model, bumped, mask)[0, 0]):
            raise BidirectionalityError(
                f"{type(model).__name__} attends causally when the batch is padded: the causal mask comes "
                "back with padding. Set config.is_causal=False on the instance (embedtune's conversion does)."
            )
        repadded = batch.clone()
        repadded[0, -2:] = (repadded[0, -2:] + 7 - 10) % (vocab - 10) + 10  # change only padded positions
        real = mask[0].bool()
        if _changed(_hidden(model, batch, mask)[0, real], _hidden(model, repadded, mask)[0, real]):
            raise BidirectionalityError(
                f"{type(model).__name__} lets padding tokens change real tokens' outputs: the attention mask "
                "is not applied. Check attn_implementation and that the attention_mask reaches the model."
            )
    finally:
        model.train(was_training)
