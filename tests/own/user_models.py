"""A user's own models and data, imported by file path in the tests ("tests/own/user_models.py:fn")."""

from __future__ import annotations

import torch
from torch import nn


class TinyAttentionLM(nn.Module):
    """Token embedding → nn.MultiheadAttention (causal) → LayerNorm → tied readout: logits ``[B, T, V]``."""

    def __init__(self, vocab: int = 7, dim: int = 4, heads: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        T = ids.shape[1]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=ids.device), 1)
        a, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        return self.head(self.norm(h + a))


def attention_lm(vocab: int = 7, dim: int = 4, heads: int = 1) -> nn.Module:
    return TinyAttentionLM(vocab, dim, heads)


class TupleOut(nn.Module):
    """Returns ``(logits, features)``: reduced to the first tensor by the output rule."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x), x


def tuple_model() -> nn.Module:
    return TupleOut()


def broken_model() -> nn.Module:
    raise RuntimeError("out of coffee")


def token_data(n: int = 6, T: int = 5, vocab: int = 7, seed: int = 0) -> dict:
    """Random token sequences; targets = inputs (shift in the loss), a few positions ignored (-100)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, T), generator=g)
    y = x.clone()
    y[0, -1] = -100
    y[1, 2] = -100
    return {"train": (x, y), "test": (x.flip(0), y.flip(0))}


def lm_tokens(n: int = 8, T: int = 8, vocab: int = 97, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences for a causal LM: targets are the inputs (the loss shifts them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, T), generator=g)
    return x, x.clone()
