"""Train a LightningModule sharded with FSDP2 (``ModelParallelStrategy``; ``fully_shard`` in
``configure_model``) on CPU gloo ranks with ``dynascope.LightningTracker``. Run under ``torchrun``:

    torchrun --standalone --nproc-per-node 2 tests/own/lightning_fsdp.py RUN_DIR OUT_DIR

float64 weights (built in float64: the strategy refuses ``precision="64-true"``), tanh (FSDP's
finite-difference product needs a smooth model), 12 SGD steps
on 32 samples (16 per rank); each rank writes ``OUT_DIR/rank<r>.json`` (whether it wrote) and rank 0 the
final full state dict ``OUT_DIR/final.pt``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn

STEPS, LR = 12, 0.1


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g)


class ShardedNet(L.LightningModule):
    """A tanh MLP 4→8→3 whose layers and root are sharded by ``fully_shard`` when Lightning configures it."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3)).double()

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def main(run_dir: str, out_dir: str) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    import dynascope

    torch.set_num_threads(1)
    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    tracker = dynascope.LightningTracker(run_dir, data=(x, y), loss="cross_entropy", budget=None,
                                         schedule="linear", checkpoint_every=4,
                                         probes={"lambda_max": {"every": 6, "tol": 1e-10}})  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(),
                        max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[tracker])  # fmt: skip
    model = ShardedNet()
    trainer.fit(model, loader)
    t = tracker.tracker
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    info = {"tracked": t is not None, "writer": bool(t and t.writer), "collective": bool(t and t.collective)}
    (Path(out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(info))
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}  # a collective on every rank
    if trainer.global_rank == 0:
        torch.save(full, Path(out_dir) / "final.pt")


if __name__ == "__main__":  # the class a reader imports: lightning_fsdp.ShardedNet, not __main__'s
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import lightning_fsdp

    lightning_fsdp.main(*sys.argv[1:3])
