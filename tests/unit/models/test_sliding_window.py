"""The sliding window is off in the attention modules too, not only in the configs.

Qwen2/Gemma3 attention modules copy ``config.sliding_window`` at init and pass their copy to the kernel;
flash-attention applies it (SDPA/eager take the window from the mask instead). A CPU kernel that applies
the ``sliding_window`` argument the way flash-attention does stands in for it here, so a window left in
a module shows up as "a far token cannot reach the first one". Each model's config asks for a window of
2 on every sliding layer; the probe changes the last of 8 tokens, out of reach of position 0 in 2
windowed layers.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, AutoConfig, AutoModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from embedtune.models.bidirectional import attention_windows, make_bidirectional

DIMS = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)
WINDOWED = {
    "qwen2": dict(use_sliding_window=True, sliding_window=2, max_window_layers=0),  # both layers sliding
    "gemma3_text": dict(sliding_window=2, layer_types=["sliding_attention", "sliding_attention"]),
    "mistral": dict(sliding_window=2),
}
FLASH_LIKE = "embedtune_test_window_kernel"


def flash_like_attention(module, query, key, value, attention_mask, sliding_window=None, **kwargs):
    """SDPA that, like flash-attention, also applies the ``sliding_window`` the module hands it."""
    if sliding_window is not None:
        pos = torch.arange(query.shape[-2], device=query.device)
        band = (pos[:, None] - pos[None, :]).abs() < sliding_window  # (q, k), flash's two-sided window
        attention_mask = band if attention_mask is None else attention_mask & band
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(FLASH_LIKE, flash_like_attention)
AttentionMaskInterface.register(FLASH_LIKE, sdpa_mask)


def build(family: str, attn: str) -> torch.nn.Module:
    cfg = AutoConfig.for_model(family, **DIMS, **WINDOWED[family])
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return AutoModel.from_config(cfg).eval()


@torch.no_grad()
def far_token_reaches_the_first(model: torch.nn.Module, seq: int = 8) -> bool:
    ids = torch.randint(10, DIMS["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(0))
    bumped = ids.clone()
    bumped[0, -1] = (bumped[0, -1] + 1 - 10) % (DIMS["vocab_size"] - 10) + 10
    a = model(input_ids=ids, use_cache=False).last_hidden_state[0, 0]
    b = model(input_ids=bumped, use_cache=False).last_hidden_state[0, 0]
    return bool((a - b).abs().max() > 1e-5)


@pytest.mark.parametrize("family", list(WINDOWED))
def test_the_probe_sees_the_window_before_conversion(family):
    """The control: with its window of 2, the unconverted model's first token cannot see the last one."""
    model = build(family, FLASH_LIKE)
    model.config.is_causal = False  # bidirectional but windowed: only the window stops the far token
    for m in model.modules():
        if isinstance(getattr(m, "is_causal", None), bool):
            m.is_causal = False
    assert not far_token_reaches_the_first(model)


@pytest.mark.parametrize("attn", [FLASH_LIKE, "sdpa", "eager"])
@pytest.mark.parametrize("family", list(WINDOWED))
def test_no_window_is_left_in_any_attention_module(family, attn):
    model = make_bidirectional(build(family, attn))
    windows = attention_windows(model)
    assert len(windows) == DIMS["num_hidden_layers"]
    assert all(w is None for w in windows.values()), windows
    assert far_token_reaches_the_first(model)


def test_gemma3_keeps_its_local_rope_for_the_formerly_sliding_layers():
    """Gemma 3's local layers use another RoPE base; renaming them to full_attention would change it."""
    model = make_bidirectional(build("gemma3_text", "sdpa"))
    assert model.config.layer_types == ["sliding_attention", "sliding_attention"]
    assert model.config.sliding_window > 10**6  # a window no input reaches
