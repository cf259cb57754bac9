"""Models and data of a user's own that take HF-style dict batches, imported by file path in the tests
("tests/own/dict_models.py:fn"): a masked-mean classifier, a model with an auxiliary head, a model calling
``scaled_dot_product_attention`` itself, and a small GRU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

VOCAB, T, PAD = 11, 6, 0


class MaskedMean(nn.Module):
    """Embedding → mean over the positions the mask keeps → tanh → linear. Without a mask every position
    counts (padding included), so a probe that drops ``attention_mask`` measures another function."""

    def __init__(self, vocab: int = VOCAB, dim: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        e = self.emb(input_ids)
        m = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        m = m.unsqueeze(-1).to(e.dtype)
        return self.head(torch.tanh((e * m).sum(1) / m.sum(1)))


def masked_mean(dim: int = 3, classes: int = 3) -> nn.Module:
    return MaskedMean(VOCAB, dim, classes)


def masked_tokens(n: int = 12, seed: int = 0, classes: int = 3) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask", "labels"}``: sequences of 2..T tokens, right-padded with ``PAD``."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None] < lens[:, None]).long()
    ids = torch.randint(1, VOCAB, (n, T), generator=g) * mask + PAD * (1 - mask)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, classes, (n,), generator=g)}


class DictItems(Dataset):
    """A map-style Dataset of per-sample dicts (what a Hugging Face collator batches)."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return int(next(iter(self.batch.values())).shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


def masked_loader(n: int = 12, seed: int = 0, batch_size: int = 5) -> DataLoader:
    """A data factory returning a ``DataLoader`` of dict batches (uneven last batch)."""
    return DataLoader(DictItems(masked_tokens(n, seed)), batch_size=batch_size)


class AuxHead(nn.Module):
    """Returns ``{"logits", "aux"}``: a class head and an auxiliary regression head on one body."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)
        self.aux = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.body(x))
        return {"logits": self.head(h), "aux": self.aux(h)}


class RawSDPA(nn.Module):
    """One attention layer written with ``F.scaled_dot_product_attention`` (no ``*Attention`` module)."""

    def __init__(self, dim: int = 4, classes: int = 2) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(F.scaled_dot_product_attention(q, k, v).mean(1))


class GRUNet(nn.Module):
    """``nn.GRU`` over a sequence, a linear readout of the last state."""

    def __init__(self, d_in: int = 3, hidden: int = 4, out: int = 2) -> None:
        super().__init__()
        self.rnn = nn.GRU(d_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o, _ = self.rnn(x)
        return self.head(o[:, -1])


class FrozenBody(nn.Module):
    """A two-layer MLP whose first layer a spec freezes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def frozen_body() -> nn.Module:
    return FrozenBody()


def classes(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def bert_items(n: int = 12, seed: int = 0) -> DictItems:
    """A Dataset of ``{"input_ids", "attention_mask", "labels"}`` items for a 2-class tiny BERT (padded)."""
    batch = masked_tokens(n, seed, classes=2)
    return DictItems(batch)
