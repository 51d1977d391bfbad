"""A tiny random BERT with dropout on (0.1 on hidden states and attention), for the dropout tests."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel


def dropout_bert(attn_implementation: str = "eager", seed: int = 0) -> BertModel:
    """2 layers, hidden 32, 2 heads, vocabulary 100, 32 positions; weights drawn after ``manual_seed(seed)``."""
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(seed)
    return BertModel(cfg)
