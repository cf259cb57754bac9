"""A Lightning ``Callback`` that runs a :class:`~dynascope.tracker.Tracker` inside ``Trainer.fit``.

    trainer = lightning.Trainer(max_steps=1000, callbacks=[dynascope.LightningTracker(
        "runs/my_run", loss="cross_entropy", probes={"lambda_max": 50})])

The tracked model is the ``LightningModule`` (its forward gives the logits probes differentiate), the
optimizer ``trainer.optimizers[0]``, the data ``data=`` or else the trainer's training DataLoader (its first
``probe_samples`` samples); the model spec is the module's class with its ``hparams`` unless ``model_spec=``.
``Tracker.step(trainer.global_step)`` runs after every training batch with the batch loss (``train_loss``) and
the trainer's logged scalars; only global rank 0 writes. A module sharded by FSDP2 (Lightning's
``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model``) is tracked by every rank: probes and
checkpoints are collectives (see :mod:`dynascope.tracker`), and its class must be importable (or pass
``model_spec=``). Every Tracker keyword passes through
(``probe_worker``, ``probe_threads``, ``budget``, ...); ``steps`` defaults to the trainer's ``max_steps`` (or
its estimated stepping batches), so the cadence warning states planned vs possible probe runs.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch import Callback

from dynascope.probes.sharded import is_fsdp

from .tracker import Tracker

__all__ = ["LightningTracker"]


def _metrics(trainer: Any, outputs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in dict(getattr(trainer, "callback_metrics", {}) or {}).items():
        if getattr(v, "numel", lambda: 1)() == 1:
            out[str(k)] = v
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if loss is not None and getattr(loss, "numel", lambda: 0)() == 1:
        out["train_loss"] = loss
    return out


class LightningTracker(Callback):
    """Track a Lightning run into ``run_dir``; keyword arguments go to :class:`Tracker`."""

    def __init__(self, run_dir: str | os.PathLike[str], *, data: Any = None, **tracker_kwargs: Any) -> None:
        super().__init__()
        self.run_dir, self.data, self.kwargs = run_dir, data, tracker_kwargs
        self.tracker: Tracker | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not (trainer.is_global_zero or is_fsdp(pl_module)):  # a sharded model: every rank joins
            return
        data = self.data if self.data is not None else trainer.train_dataloader
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        kwargs = dict(self.kwargs)
        if "steps" not in kwargs:  # the run's length, for the tracker's planned vs possible probe runs
            steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            if steps is None:
                try:
                    total = trainer.estimated_stepping_batches
                    steps = int(total) if total != float("inf") and total > 0 else None
                except Exception:  # noqa: BLE001 - an estimate only
                    steps = None
            kwargs["steps"] = steps
        self.tracker = Tracker(self.run_dir, pl_module, data=data, optimizer=optimizer, **kwargs)
        self.tracker.step(int(trainer.global_step))

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.tracker is not None:
            self.tracker.step(int(trainer.global_step), metrics=_metrics(trainer, outputs))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.tracker is not None:
            self.tracker.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.tracker is not None:
            self.tracker.close(error=f"{type(exception).__name__}: {exception}")
