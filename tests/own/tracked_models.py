"""Models a user trains with ``dynascope.Tracker`` in the tests, imported by file path when a run re-opens."""

from __future__ import annotations

import torch
from torch import nn


class SmallNet(nn.Module):
    """Two-layer tanh MLP ``in_dim → width → out_dim``."""

    def __init__(self, in_dim: int = 4, width: int = 8, out_dim: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, width)
        self.fc2 = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class NeedsArgs(nn.Module):
    """A model whose constructor needs an argument the tracker cannot know."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(4, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)
