"""A Hugging Face ``TrainerCallback`` running a :class:`~dynascope.tracker.Tracker` inside ``Trainer.train``.

    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[dynascope.HFTracker(
        "runs/my_run", loss={"name": "token_cross_entropy", "shift": True}, probes={"lambda_max": 50})])

The tracked model is the Trainer's model (a ``PreTrainedModel``: its config is saved to ``<run>/hf_config``
and the run's model spec is ``{"hf": <run>/hf_config}``; probes take its ``.logits``), the optimizer the
Trainer's (unwrapped from accelerate), the data ``data=`` or else the training DataLoader
(dict batches: every key but ``labels`` reaches ``forward``, e.g. ``input_ids`` and ``attention_mask``).
A model sharded by FSDP2 (``fully_shard``; accelerate's FSDP, which needs an accelerator: on CPU the
Trainer trains with DDP instead) is tracked by every rank, its probes and checkpoints being collectives.
``Tracker.step(state.global_step)`` runs at every optimizer step; the Trainer's logs (``loss`` as
``train_loss``, ``learning_rate``, ``grad_norm``) join the same step's row. Only world process zero writes.
Every Tracker keyword passes through (``probe_worker``, ``probe_threads``, ``budget``, ...); ``steps``
defaults to the Trainer's ``max_steps``, so the cadence warning states planned vs possible probe runs.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback

from dynascope.probes.sharded import is_fsdp

from .tracker import Tracker

__all__ = ["HFTracker"]


class HFTracker(TrainerCallback):
    """Track a Hugging Face Trainer run into ``run_dir``; keyword arguments go to :class:`Tracker`."""

    def __init__(self, run_dir: str | os.PathLike[str], *, data: Any = None, **tracker_kwargs: Any) -> None:
        self.run_dir, self.data, self.kwargs = run_dir, data, tracker_kwargs
        self.tracker: Tracker | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:  # fmt: skip
        if not (state.is_world_process_zero or is_fsdp(model)):  # a sharded model: every rank joins
            return
        data = self.data if self.data is not None else train_dataloader
        kwargs = dict(self.kwargs)
        if "steps" not in kwargs:  # the run's length, for the tracker's planned vs possible probe runs
            kwargs["steps"] = int(state.max_steps) if state.max_steps and state.max_steps > 0 else None
        self.tracker = Tracker(self.run_dir, model, data=data, optimizer=optimizer, **kwargs)
        self.tracker.step(int(state.global_step))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracker is not None:
            self.tracker.step(int(state.global_step))

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if self.tracker is not None and logs:
            names = {"loss": "train_loss", "learning_rate": "lr"}
            self.tracker.log(int(state.global_step), {names.get(k, k): v for k, v in logs.items()})

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracker is not None:
            self.tracker.close()
