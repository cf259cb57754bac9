"""The training loop behind every recipe: writes a run folder, resumable and deterministic by seed.

Everything the loop needs is read from the run's ``run.json`` (see :class:`dynascope.models.Run`):
model config (its ``seed`` fixes the initial weights), dataset config, optimizer
``{"name": "sgd" | "adam" | "adamw", "lr", ...torch kwargs}``, learning-rate schedule, loss name, and
``extra["train"]`` = ``{"batch_size": None | int, "steps", "log_every", "checkpoint_steps"}``.

Conventions
-----------
* Step ``s`` means "after ``s`` optimizer updates"; metrics and checkpoints at step ``s`` describe those
  weights. Step 0 is the initialisation.
* Training loss: the mean over the batch of the per-sample loss ``ℓ`` of
  :mod:`dynascope.probes.losses` (``"cross_entropy"``, ``"mse"``, ``"half_sse"`` = ½‖f − y‖²), so a
  probe with the same ``loss=`` sees the same objective on the full training set.
* Logged metrics (``metrics.csv``, every ``log_every`` steps and at every checkpoint), on the whole
  train / test set in eval mode: ``train_loss``, ``test_loss`` (dataset means), ``train_acc``,
  ``test_acc`` (argmax of the output against the integer label, or against the argmax of one-hot
  targets), ``lr`` (the rate used for the *next* update), ``weight_norm`` (‖θ‖₂ over all parameters)
  plus whatever ``eval_fn`` / ``checkpoint_fn`` return.
* Mini-batches (``batch_size`` set): epoch ``e`` visits the training set in the order
  ``randperm(N)`` of a generator seeded with ``(seed, e)``; the last partial batch is dropped
  unless it is the only one. Any other randomness of a step (dropout) is seeded with ``(seed, step)``.
  Batch order and lr are pure functions of the step, so resuming from a checkpoint (weights +
  optimizer state) reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..models import Run, RunError, lr_at, weight_norm
from ..probes.losses import resolve_loss

__all__ = [
    "train",
    "checkpoint_schedule",
    "make_optimizer",
    "evaluate",
    "weight_norm",
    "ProgressFn",
    "OPTIMIZERS",
]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}

#: ``progress`` callback: ``fn(step, total_steps, metrics_of_the_last_log_row)``.
ProgressFn = Callable[[int, int, Mapping[str, Any]], None]
MetricFn = Callable[[nn.Module, int, Any], Mapping[str, Any]]
#: ``checkpoint_fn(model, step, data, optimizer)``: metrics at a checkpoint, with the optimizer (its state
#: holds e.g. Adam's preconditioner)
CheckpointFn = Callable[[nn.Module, int, Any, torch.optim.Optimizer], Mapping[str, Any]]


# ----------------------------------------------------------------------------------- schedules
def checkpoint_schedule(
    steps: int, schedule: str | int | Sequence[int] = "log", *, n_checkpoints: int = 30
) -> list[int]:
    """Sorted checkpoint steps in ``[0, steps]``, always including 0 and ``steps``.

    ``"log"``: 0 plus ``n_checkpoints`` geometrically spaced steps from 1 to ``steps`` (rounded, unique);
    ``"linear"``: ``n_checkpoints + 1`` evenly spaced steps; an int ``k``: every ``k`` steps;
    a list: those steps (values outside ``[0, steps]`` are an error).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if isinstance(n_checkpoints, bool) or not isinstance(n_checkpoints, int) or n_checkpoints < 1:
        raise ValueError(f"n_checkpoints must be a positive int, got {n_checkpoints!r}")
    if isinstance(schedule, str):
        if schedule == "log":
            pts = np.geomspace(1, max(steps, 1), n_checkpoints) if steps > 0 else np.array([])
        elif schedule == "linear":
            pts = np.linspace(0, steps, n_checkpoints + 1)
        else:
            raise ValueError(
                f"checkpoint schedule must be 'log', 'linear', an int or a list; got {schedule!r}"
            )
        out = {int(round(float(p))) for p in pts}
    elif isinstance(schedule, int) and not isinstance(schedule, bool):
        if schedule < 1:
            raise ValueError(f"checkpoint interval must be a positive int, got {schedule}")
        out = set(range(0, steps + 1, schedule))
    elif isinstance(schedule, Sequence):
        out = set()
        for s in schedule:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= int(s) <= steps:
                raise ValueError(f"checkpoint step {s!r} is not an int in [0, {steps}]")
            out.add(int(s))
    else:
        raise TypeError(f"checkpoint schedule must be 'log', 'linear', an int or a list; got {schedule!r}")
    return sorted(out | {0, steps})


# ----------------------------------------------------------------------------------- helpers
def make_optimizer(config: Mapping[str, Any], params: Any) -> torch.optim.Optimizer:
    """A torch optimizer from ``{"name": "sgd" | "adam" | "adamw", "lr", **kwargs}``."""
    if not isinstance(config, Mapping) or "name" not in config:
        raise ValueError(f"optimizer config must be a dict with a 'name', got {config!r}")
    cfg = dict(config)
    name = str(cfg.pop("name")).lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    if "betas" in cfg:
        cfg["betas"] = tuple(cfg["betas"])
    try:
        return OPTIMIZERS[name](params, **cfg)
    except TypeError as e:
        raise ValueError(f"optimizer {name!r}: invalid config {dict(config)} ({e})") from None


def _accuracy(out: Tensor, y: Tensor) -> float | None:
    """Fraction of argmax(out) == label; one-hot float targets compare with argmax(y); None for regression."""
    if out.dim() != 2 or out.shape[1] < 2:
        return None
    if y.is_floating_point():
        if y.shape != out.shape:
            return None
        y = y.argmax(dim=1)
    return float((out.argmax(dim=1) == y).double().mean())


@torch.no_grad()
def evaluate(
    model: nn.Module, data: tuple[Tensor, Tensor], loss_fn: Any, chunk: int = 8192
) -> dict[str, Any]:
    """Mean loss and accuracy of ``model`` on ``(x, y)`` in eval mode (chunked forward passes)."""
    x, y = data
    was_training = model.training
    model.eval()
    total, correct_outs = 0.0, []
    try:
        for lo in range(0, x.shape[0], chunk):
            out = model(x[lo : lo + chunk])
            total += float(loss_fn.total(out, y[lo : lo + chunk]).double())
            correct_outs.append(out)
    finally:
        model.train(was_training)
    out = torch.cat(correct_outs)
    return {"loss": total / x.shape[0], "acc": _accuracy(out, y)}


def _batch_indices(n: int, batch_size: int | None, step: int, seed: int) -> Tensor | None:
    """Indices of the training batch for update ``step`` (None: full batch)."""
    if batch_size is None or batch_size >= n:
        return None
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))
    perm = torch.randperm(n, generator=gen)
    return perm[k * batch_size : (k + 1) * batch_size]


class _Progress:
    """tqdm bar on stderr (``progress=True``), a user callback, or nothing."""

    def __init__(self, progress: bool | ProgressFn, total: int, start: int, desc: str) -> None:
        self.fn = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", file=sys.stderr, leave=False)
        self.total = total

    def update(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.bar is not None:
            self.bar.n = step
            shown = {
                k: metrics[k] for k in ("train_loss", "train_acc", "test_acc") if metrics.get(k) is not None
            }
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
            self.bar.refresh()
        if self.fn is not None:
            self.fn(step, self.total, dict(metrics))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------- the loop
def _as_run(run_or_config: Run | str | os.PathLike[str] | Mapping[str, Any], overwrite: bool) -> Run:
    if isinstance(run_or_config, Run):
        return run_or_config
    if isinstance(run_or_config, (str, os.PathLike)):
        return Run.open(run_or_config)
    if isinstance(run_or_config, Mapping):
        cfg = dict(run_or_config)
        if "path" not in cfg:
            raise ValueError("a run config needs a 'path' (the run folder to write)")
        path = Path(cfg.pop("path"))
        allowed = {"model", "dataset", "optimizer", "lr_schedule", "seed", "notes", "loss", "extra"}
        unknown = sorted(set(cfg) - allowed)
        if unknown:
            raise ValueError(f"unknown run config keys {unknown}; accepted: {sorted(allowed | {'path'})}")
        if (path / "run.json").is_file() and not overwrite:
            return _same_run(path, Run.new_config(path, **cfg))
        return Run.create(path, overwrite=overwrite, **cfg)
    raise TypeError(
        f"train() needs a Run, a run folder path or a run config dict, got {type(run_or_config).__name__}"
    )


#: What makes an existing run folder the same run as a config: these run.json keys and the recipe's config
#: but for the keys of :data:`_RESUMABLE` (training longer, or on another device, continues the same run).
_SAME_RUN = ("model", "dataset", "optimizer", "lr_schedule", "loss", "seed")
_RESUMABLE = ("steps", "device")


def _same_run(path: Path, want: Mapping[str, Any]) -> Run:
    """The run at ``path`` when it is the run ``want`` describes (to resume it); otherwise ``RunError``:
    another run's folder is never trained into nor cleared without ``overwrite``."""
    run = Run.open(path)

    def canon(v: Any) -> Any:
        return json.loads(json.dumps(v))

    def recipe_config(extra: Mapping[str, Any]) -> Any:  # how long and where it trains is not another run
        cfg = extra.get("config")
        return {k: v for k, v in cfg.items() if k not in _RESUMABLE} if isinstance(cfg, Mapping) else cfg

    differs = [k for k in _SAME_RUN if canon(want.get(k)) != canon(run.config.get(k))]
    mine, theirs = want.get("extra") or {}, run.extra
    if canon(mine.get("recipe")) != canon(theirs.get("recipe")):
        differs.append("extra.recipe")
    if canon(recipe_config(mine)) != canon(recipe_config(theirs)):
        differs.append("extra.config")
    if differs:
        raise RunError(
            path,
            f"already holds another run (its {', '.join(differs)} differ); nothing was changed. Pass "
            "overwrite=True (--overwrite) to replace it, or write to another folder",
        )
    return run


def train_recipe(run_cfg: Mapping[str, Any], cfg: Mapping[str, Any], **kwargs: Any) -> Run:
    """:func:`train` with what a recipe config names: ``steps``, ``log_every``, ``device`` and, when given,
    ``n_checkpoints`` (log-spaced) or ``checkpoint_steps`` and ``save_optimizer``; ``kwargs`` (the
    recipe's ``progress``, ``resume``, ``overwrite``, …) are passed on and win."""
    named = {"steps": int(cfg["steps"]), "log_every": int(cfg["log_every"]), "device": cfg["device"]}
    for key in ("n_checkpoints", "checkpoint_steps", "save_optimizer"):
        if key in cfg:
            named[key] = int(cfg[key]) if key == "n_checkpoints" else cfg[key]
    return train(run_cfg, **{**named, **kwargs})


def train(
    run_or_config: Run | str | os.PathLike[str] | Mapping[str, Any],
    *,
    steps: int,
    log_every: int = 10,
    checkpoint_steps: str | int | Sequence[int] = "log",
    n_checkpoints: int = 30,
    batch_size: int | None = None,
    save_optimizer: bool | str = True,
    progress: bool | ProgressFn = True,
    resume: bool = True,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    eval_fn: MetricFn | None = None,
    checkpoint_fn: CheckpointFn | None = None,
) -> Run:
    """Train the run's model and write checkpoints and metrics into its folder; returns the :class:`Run`.

    ``run_or_config``: a :class:`Run`, a run folder, or ``{"path", "model", "dataset", "optimizer",
    "lr_schedule", "loss", "seed", "extra", "notes"}`` (see ``Run.create``; an existing run at
    ``path`` is reused unless ``overwrite``). ``checkpoint_steps``: see :func:`checkpoint_schedule`.
    ``batch_size``: ``None`` for full-batch training. ``save_optimizer``: ``True`` (state at every
    checkpoint, as preconditioned-sharpness probes of Adam runs need), ``"last"`` (only at the latest
    checkpoint, enough to resume) or ``False``. ``resume``: continue from the last checkpoint with
    optimizer state when the folder already holds checkpoints (otherwise start over at step 0).
    ``eval_fn(model, step, data)`` / ``checkpoint_fn(model, step, data, optimizer)`` return extra scalar
    metrics logged at every log step / every checkpoint (``data``: the dataset split with
    ``.train``/``.test`` on ``device``); they must not change the model.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every must be a positive int, got {log_every!r}")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be None or a positive int, got {batch_size!r}")
    if save_optimizer not in (True, False, "last"):
        raise ValueError(f"save_optimizer must be True, False or 'last', got {save_optimizer!r}")
    run = _as_run(run_or_config, overwrite)
    device = torch.device(device)
    ck_steps = checkpoint_schedule(steps, checkpoint_steps, n_checkpoints=n_checkpoints)
    ck_set = set(ck_steps)

    cfg = run.config
    if cfg.get("optimizer") is None:
        raise ValueError(f"run '{run.path}' has no optimizer config; train() needs one")
    seed = int(cfg.get("seed", 0))
    model = run.build_model().to(device)
    data = run.load_dataset()
    x_tr, y_tr = (t.to(device) for t in data.train)
    x_te, y_te = (t.to(device) for t in data.test)
    dev_data = _DeviceSplit((x_tr, y_tr), (x_te, y_te), getattr(data, "info", {}))
    loss_fn = resolve_loss(cfg.get("loss") or "auto", y_tr)
    optimizer = make_optimizer(cfg["optimizer"], model.parameters())
    sched = cfg.get("lr_schedule")
    base_lr = float(cfg["optimizer"]["lr"])

    def lr_for(step: int) -> float:
        return lr_at(sched, step, base_lr) if sched else base_lr

    start = 0
    run.remove_orphans()  # this process is the run's writer: any temporary file is a killed one's
    existing = run.checkpoints()
    done = [c for c in existing if c.optimizer_path is not None and c.step <= steps] if resume else []
    if existing and not done:
        why = "resume=False" if not resume else "none of them has optimizer state to resume from"
        raise RunError(
            run.path,
            f"holds {len(existing)} checkpoint(s) and {why}; nothing was changed. Pass overwrite=True "
            "(--overwrite) to start it over, or write to another folder",
        )
    if done:
        last = done[-1]
        model.load_state_dict(run.load_model(last.step).state_dict())
        run.load_optimizer_state(last.step, optimizer, model)
        start = last.step
    if start == steps and start > 0:
        return run
    run.truncate_metrics(start - 1)  # the resumed step is logged (and checkpointed) again

    bar = _Progress(progress, steps, start, desc=str(cfg.get("extra", {}).get("recipe", run.path.name)))
    model.train()
    n = x_tr.shape[0]
    prev_opt_step: int | None = start if start > 0 else None
    t0 = time.perf_counter()
    try:
        for step in range(start, steps + 1):
            is_ck = step in ck_set
            if step % log_every == 0 or is_ck:
                row: dict[str, Any] = {"step": step}
                tr = evaluate(model, (x_tr, y_tr), loss_fn)
                te = evaluate(model, (x_te, y_te), loss_fn)
                row.update(
                    train_loss=tr["loss"], train_acc=tr["acc"], test_loss=te["loss"], test_acc=te["acc"]
                )
                row.update(lr=lr_for(step), weight_norm=weight_norm(model))
                row["wall_time"] = time.perf_counter() - t0
                if eval_fn is not None:
                    row.update(eval_fn(model, step, dev_data))
                if is_ck and checkpoint_fn is not None:
                    row.update(checkpoint_fn(model, step, dev_data, optimizer))
                if not math.isfinite(row["train_loss"]):
                    run.log_metrics(row)
                    raise FloatingPointError(
                        f"training diverged: train loss {row['train_loss']} at step {step}"
                    )
                run.log_metrics(row)
                if is_ck:
                    keep_opt = save_optimizer is True or (save_optimizer == "last")
                    run.save_checkpoint(
                        model,
                        step,
                        epoch=(step * batch_size) // n if batch_size else step,
                        optimizer=optimizer if keep_opt else None,
                        metrics={k: v for k, v in row.items() if k != "step"},
                    )
                    if save_optimizer == "last" and prev_opt_step is not None:
                        (run.checkpoint_dir / f"step_{prev_opt_step:06d}.optim.pt").unlink(missing_ok=True)
                    if keep_opt:
                        prev_opt_step = step
                bar.update(step, row)
            if step == steps:
                break
            for g in optimizer.param_groups:
                g["lr"] = lr_for(step)
            idx = _batch_indices(n, batch_size, step, seed)
            xb, yb = (x_tr, y_tr) if idx is None else (x_tr[idx.to(device)], y_tr[idx.to(device)])
            with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
                torch.manual_seed((seed * 7_919 + step) % (2**63))
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn.per_sample(model(xb), yb).mean()
                loss.backward()
                optimizer.step()
    finally:
        bar.close()
    return run


class _DeviceSplit:
    """The dataset tensors on the training device: ``.train``, ``.test`` ``(x, y)`` and ``.info``."""

    def __init__(self, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], info: Mapping[str, Any]):
        self.train, self.test, self.info = train, test, dict(info)
