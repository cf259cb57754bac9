"""A LightningModule trained with ``dynascope.LightningTracker`` in the tests (re-opened by file path)."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn


class LitNet(L.LightningModule):
    """Two-layer tanh MLP classifier, SGD; its hparams rebuild it."""

    def __init__(self, in_dim: int = 4, width: int = 8, out_dim: int = 3, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.fc1 = nn.Linear(in_dim, width)
        self.fc2 = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("batch_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
