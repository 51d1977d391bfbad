"""Tiny stand-in encoders for training tests (no downloads, a few thousand parameters)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyEncoder(nn.Module):
    """Embedding -> one transformer layer (with dropout) -> masked mean pooling -> L2.

    Follows the BiEncoder call contract: ``enc(input_ids, attention_mask, pooling_mask)``.
    """

    def __init__(self, vocab: int = 50, dim: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.layer = nn.TransformerEncoderLayer(dim, 2, 64, dropout=dropout, batch_first=True)
        self.out = nn.Linear(dim, dim)

    def forward(self, input_ids, attention_mask, pooling_mask=None):
        h = self.layer(self.emb(input_ids), src_key_padding_mask=attention_mask == 0)  # (b, s, d)
        m = (attention_mask if pooling_mask is None else pooling_mask).unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        return F.normalize(self.out(pooled), dim=-1)


def random_inputs(g: torch.Generator, n: int, seq: int, vocab: int = 50, instruction: int = 0):
    """Random right-padded token batch; the first ``instruction`` tokens are left out of pooling."""
    ids = torch.randint(1, vocab, (n, seq), generator=g)
    lengths = torch.randint(instruction + 2, seq + 1, (n,), generator=g)
    attn = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = ids * attn
    pool = attn.clone()
    pool[:, :instruction] = 0
    return {"input_ids": ids, "attention_mask": attn, "pooling_mask": pool}
