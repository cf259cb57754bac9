"""Track your own training: :class:`Tracker` writes a run folder from inside any training loop.

    tracker = dynascope.Tracker("runs/my_run", model, data=(x, y), loss="cross_entropy", optimizer=opt,
                                probes={"lambda_max": 50, "gradient_coherence": 200})
    for step in range(1, steps + 1):
        ...; opt.step()
        tracker.step(step, metrics={"train_loss": loss.item()})
    tracker.close()                      # or: with dynascope.Tracker(...) as tracker: ...

What it writes (the run folder format of :class:`dynascope.models.Run`, nothing new besides the status file):

* ``run.json`` with the model, data and loss specs. The model spec is ``model_spec=`` when given, else the
  config of a model built by dynascope, else a Hugging Face model's config saved to ``<run>/hf_config``, else
  the structure of a ``Sequential`` of ``torch.nn`` layers (:mod:`dynascope.models.structure`), else the
  model's class as a factory (``"pkg.module:Class"`` for installed packages, ``"/path/file.py:Class"``
  otherwise; a LightningModule's ``hparams`` as its kwargs), else — a class no reader can import (defined in
  a notebook, ``__main__`` or a function) — the model exported with ``torch.export`` (eval mode) to
  ``<run>/model.export.json`` + ``.safetensors``, read back without unpickling anything
  (:mod:`dynascope.models.exported`); where export fails the tracker warns why and asks for ``model_spec=``.
  The tracker rebuilds that spec once and records
  in ``extra["tracker"]["model_spec"]`` whether the run can be re-opened with it (``reopenable``) and why not.
* The data: a data spec is stored as given and the probe batch is its first ``probe_samples`` training
  samples (the runner's ``max_samples``); tensors, a ``Dataset`` or a ``DataLoader`` are cut to their first
  ``probe_samples`` samples, saved to ``<run>/probe_data.safetensors`` and that file is the run's data spec.
* ``checkpoints/step_*.safetensors`` (+ optimizer state) at the steps of the checkpoint schedule
  (:func:`dynascope.models.checkpoint_due`) and at every step an inline probe runs, ``metrics.csv`` rows
  (buffered, flushed at checkpoints and every ``heartbeat_s`` seconds), and ``tracker.json``: the writer's
  status (``state`` running / finished / failed, pid, host, heartbeat time, last step, overhead, skipped
  probes). :func:`run_status` reads it; a killed process leaves ``state: running`` with a dead pid, shown as
  "stopped without closing". Every file is written atomically, so readers see a consistent run meanwhile.

Inline probes run on the fixed probe batch at their interval (``probes={name: every}`` or ``{name: {"every":
n, **params}}``) on the weights of the checkpoint written at that step, and are stored in the run's result
store under the key :func:`dynascope.runner.plan` computes for that checkpoint — so the notebook, CLI and
app find them as cached results. Where they run (``probe_worker``): by default in a forked worker process
with its own torch threads (``probe_threads``, default 1; with a budget its probe thread runs at a lower
priority, ``PROBE_NICE``), which gets the checkpoint's weights and computes while training goes on
(:mod:`dynascope.track_worker`); it stores the results itself and their scalars join that step's metrics
row (held back until then). With ``probe_worker="inline"`` (or where no fork is available: a CUDA model,
macOS, one usable core; and for FSDP-collective probes) they run on the in-memory model on the training
thread.

* ``"lambda_max"`` / ``"sharpness"`` → runner probe ``sharpness`` with ``k=1, tol=1e-3, trace=False`` and
  ``lr`` = the optimizer's current rate (the parameters of the app's edge-of-stability page), Lanczos
  warm-started from the previous block's eigenvector (``v0`` is not part of the key);
  ``{"sharpness": {"every": n, "tol": 1e-4, "trace": True, "lr": None}}`` stores under the key of a bare
  ``probe("sharpness", step=s)``;
* ``"hessian_eigenvalues"`` → ``hessian_eigenvalues`` (runner defaults ``k=5, tol=1e-4``), warm-started;
* ``"gradient_coherence"`` → ``gradient_coherence`` (per-sample gradients of the probe batch): logs
  ``grad_norm`` = ‖mean gradient‖ (plug-in) and ``coherence_alpha``;
* ``"ntk"`` / ``"ntk_alignment"`` → ``ntk`` on the first ``ntk_samples`` samples (``max_samples``).

Writes leave the training thread: a checkpoint is a CPU snapshot of the weights and optimizer state taken
at once and written (atomically, fsynced) in order with the metrics rows, the status and the inline
results. With the probe worker the worker process writes them all (:class:`RunFiles`, its forked copy): the
snapshot goes to it as one packed byte buffer and the training process runs no thread of its own (a Python
thread there would share the interpreter lock with the training loop); a worker that dies hands back what
it had not written, which the training process then writes. Without it one background writer thread does
(:mod:`dynascope.track_writer`). ``background_writes=False`` waits for each write on the training thread.
A step's metrics row is written with the next flush after that step (``log()`` calls after ``step()`` join
it); flushes happen at checkpoints, every ``heartbeat_s`` seconds and at ``close()``. Killed with
``kill -9``, the training process leaves its worker to finish the probe it computes and write every row and
status it was sent, then exit.

Overhead budget (:mod:`dynascope.track_budget`): the tracker times the training between its calls and its
own time — checkpoint snapshots, hand-offs to the writer, the worker and waits for them, inline probes on
the training thread, the background writer's CPU time (it shares the interpreter lock with training), and
the worker's interference (the slowdown of the training steps taken while it computes, measured against the
steps taken while it is idle) — and keeps that total under ``budget`` × training time (default 10 %): a
due probe whose last cost
would cross the budget is deferred (skipped, recorded in ``tracker.json`` ``skipped``) and its interval
doubles; a stretched interval halves again (``relaxed``) when a run leaves the overhead at most half the
budget. A due probe is skipped too while the worker still computes an earlier step (one core delivers what
it can; no backlog grows). Checkpoints on the schedule are never deferred nor dropped; when they alone
exceed the budget the status's ``overhead.over_budget`` says so. ``close()`` waits for the probe the
worker computes while the budget has room (always for a probe's first run); past it the run is dropped and
recorded as skipped. ``budget=None`` never defers nor skips (training waits for the worker when it falls
behind).

Planned vs done: each probe's summary in ``tracker.json`` (and at ``close()`` in ``run.json``
``extra.tracker.probes``) counts ``planned`` runs (steps at the requested interval), ``done`` and
``skipped``, and ``possible_every``, the interval the tracker can keep, estimated from the probe's last run
and the mean training step; when it is longer than the requested one the tracker warns once (from the
probe's second run, the first is cold) with the planned and possible numbers (over ``steps=`` when given),
and the app's Runs page shows the table.
Under ``torch.distributed`` only rank 0 writes and probes; other ranks' calls return at once — except for
a model sharded with FSDP2 (``fully_shard``), whose probes and checkpoints are collectives: every rank calls
``step`` and joins them. Its checkpoint is the full state dict (``get_model_state_dict(full_state_dict=True,
cpu_offload=True)``, gathered to rank 0, which writes it; no optimizer state), each rank probes its part of
the probe batch (:mod:`dynascope.probes.sharded`, results under the key of ``shard="fsdp"``), the probes run
at their interval (no budget deferral: every rank must take the same decision), the run folder must be
visible to every rank (rank 0 creates it; the others open it), ``resume=True`` is not available and the
probes run on the training thread (a collective needs every rank), not in the worker.
"""

from __future__ import annotations

import atexit
import collections
import copy
import datetime as _dt
import json
import math
import os
import socket
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dynascope.models import Run, RunError, checkpoint_due, load_weights
from dynascope.models.atomic import atomic_write_text
from dynascope.probes.sharded import is_fsdp

from .track_budget import Interval, OverheadBudget
from .track_worker import PROBE_NICE, ProbeOutcome, ProbeWorker, compute_probe, process_available, warm_start
from .track_writer import Writer

__all__ = ["Tracker", "run_status", "describe_status", "STATUS_FILE", "INLINE_PROBES"]

STATUS_FILE = "tracker.json"
STATUS_SCHEMA = "dynascope.tracker/1"
PROBE_DATA_FILE = "probe_data.safetensors"
HF_CONFIG_DIR = "hf_config"
#: inline probe name → (runner probe, default parameters)
INLINE_PROBES: dict[str, tuple[str, dict[str, Any]]] = {
    "lambda_max": ("sharpness", {"k": 1, "tol": 1e-3, "trace": False}),
    "sharpness": ("sharpness", {"k": 1, "tol": 1e-3, "trace": False}),
    "hessian_eigenvalues": ("hessian_eigenvalues", {}),
    "gradient_coherence": ("gradient_coherence", {}),
    "ntk": ("ntk", {}),
    "ntk_alignment": ("ntk", {}),
}
#: the newest deferred / skipped probe runs kept in ``tracker.json`` (each probe's summary counts them all)
SKIPPED_KEPT = 200
#: a heartbeat older than this (seconds) counts as stale when the writer's pid cannot be checked
STALE_AFTER_S = 300.0
#: the clock of the overhead budget (a module attribute so tests can replace it)
_clock = time.perf_counter


# ------------------------------------------------------------------------------------------ status
def _pid_alive(pid: Any) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_status(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The tracker status of a run folder (``tracker.json``), or ``None`` when no tracker wrote it.

    Adds ``live``: the run is still being written — state ``running`` and the writer process alive (same
    host), or its heartbeat fresher than :data:`STALE_AFTER_S` (another host) — and ``heartbeat_age_s``.
    """
    p = Path(path) / STATUS_FILE
    if not p.is_file():
        return None
    try:
        status = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        return {"state": "unreadable", "live": False, "error": f"{STATUS_FILE}: {e}"}
    if not isinstance(status, dict):
        return {"state": "unreadable", "live": False, "error": f"{STATUS_FILE} is not a JSON object"}
    beat = status.get("heartbeat")
    age = time.time() - beat if isinstance(beat, (int, float)) else None
    status["heartbeat_age_s"] = age
    live = False
    if status.get("state") == "running":
        if status.get("host") == socket.gethostname():
            live = _pid_alive(status.get("pid"))
        else:
            live = age is not None and age < STALE_AFTER_S
    status["live"] = live
    return status


def describe_status(status: Mapping[str, Any] | None) -> str | None:
    """One line for ``dynascope runs``: "still being written (step 120, heartbeat 3 s ago)", ..."""
    if not status:
        return None
    state, step = status.get("state"), status.get("step")
    at = f"step {step}" if step is not None else "no step yet"
    if state == "unreadable":
        return f"tracker status unreadable ({status.get('error')})"
    if status.get("live"):
        age = status.get("heartbeat_age_s")
        beat = f", heartbeat {age:.0f} s ago" if isinstance(age, (int, float)) else ""
        return f"still being written ({at}{beat})"
    if state == "running":
        return f"stopped without closing at {at} (the writer is gone)"
    if state == "failed":
        return f"training failed at {at}: {status.get('error', '')}".rstrip(": ")
    return f"finished at {at}"


# ------------------------------------------------------------------------------------------ helpers
def _is_writer() -> bool:
    """Rank 0 of ``torch.distributed`` (or no process group): the one process that writes."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _scalar(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.detach().item() if v.numel() == 1 else None
    if hasattr(v, "item") and getattr(v, "ndim", None) == 0:
        return v.item()
    return v if v is None or isinstance(v, (bool, int, float, str)) else None


def _first_samples(data: Any, n: int) -> tuple[Any, Tensor]:
    """The first ``n`` samples of ``(x, y)`` tensors, a dict of tensors, a ``Dataset`` or a ``DataLoader``
    (its batches); dict items keep every key (:func:`dynascope.datasets.batching.split_item`)."""
    from torch.utils.data import DataLoader, Dataset

    from dynascope.datasets.batching import BatchSource, concat_inputs, slice_inputs

    if not isinstance(data, (tuple, list, Mapping, DataLoader, Dataset)):
        raise ValueError(
            "data must be a data spec (dict or name), (x, y) tensors, a torch Dataset or a DataLoader; "
            f"got {type(data).__name__}"
        )
    source = BatchSource(data, None if isinstance(data, DataLoader) else n)
    xs: list[Any] = []
    ys: list[Tensor] = []
    got = 0
    try:
        for batch in source:
            xs.append(batch.x)
            ys.append(batch.y)
            got += batch.n
            if got >= n:
                break
    except (ValueError, TypeError) as e:
        raise ValueError(f"data: {e}") from None
    if not xs:
        raise ValueError("data: no samples")
    return slice_inputs(concat_inputs(xs), slice(None, n)), torch.cat(ys)[:n]


def _probe_tensors(x: Any, y: Tensor) -> tuple[dict[str, Tensor], str | list[str] | dict[str, str]]:
    """The tensors of ``probe_data.safetensors`` and the data spec's ``"x"``: ``"x"``, for a dict of
    inputs ``{input name: file key}`` (file keys ``x.<name>``), for a tuple ``[file key, ...]``."""
    if isinstance(x, Mapping):
        tensors = {f"x.{k}": v.detach().cpu().contiguous() for k, v in x.items()}
        return {**tensors, "y": y.detach().cpu().contiguous()}, {k: f"x.{k}" for k in x}
    if isinstance(x, tuple):
        tensors = {f"x.{i}": v.detach().cpu().contiguous() for i, v in enumerate(x)}
        return {**tensors, "y": y.detach().cpu().contiguous()}, list(tensors)
    return {"x": x.detach().cpu().contiguous(), "y": y.detach().cpu().contiguous()}, "x"


def _class_ref(cls: type) -> str | None:
    """``"pkg.module:Class"`` for a class of an installed package, ``"/abs/file.py:Class"`` for one defined
    in a source file (not ``__main__``: importing a training script would run it); else ``None``."""
    qual = cls.__qualname__
    if "<locals>" in qual or "." in qual:
        return None
    module = sys.modules.get(cls.__module__)
    if module is None or cls.__module__ == "__main__":
        return None
    file = getattr(module, "__file__", None)
    prefixes = {str(Path(p).resolve()) for p in (sys.prefix, sys.base_prefix)}
    if file is None or any(str(Path(file).resolve()).startswith(p) for p in prefixes):
        return f"{cls.__module__}:{qual}"
    return f"{Path(file).resolve()}:{qual}"


def _jsonable_kwargs(hparams: Any) -> dict[str, Any] | None:
    try:
        kw = dict(hparams)
        json.dumps(kw, allow_nan=False)
        return kw
    except (TypeError, ValueError):
        return None


def _cpu_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """CPU copies of ``model``'s weights under the plain module's names; for an FSDP2-sharded model the
    full state dict gathered to rank 0 (a collective: every rank calls it; the others get ``{}``)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / FSDP / ``torch.compile`` wrappers (their checkpoints carry its names)."""
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and type(model).__name__ in (
            "DistributedDataParallel", "DataParallel", "OptimizedModule", "FullyShardedDataParallel",
        ):  # fmt: skip
            return _unwrap_model(inner)
    return model


def _probe_metrics(name: str, r: Any) -> dict[str, Any]:
    """Scalars of an inline result for ``metrics.csv`` (``lambda_max`` is what the EoS page plots)."""
    if name == "sharpness":
        return {"lambda_max": r.lambda_max, "two_over_lr": r.two_over_lr}
    if name == "hessian_eigenvalues":
        return {"hessian_lambda_max": float(r.values[0])}
    if name == "gradient_coherence":
        g2 = r.grad_norm_sq_plugin
        return {"grad_norm": math.sqrt(g2) if g2 >= 0 else float("nan"), "coherence_alpha": r.alpha}
    if name == "ntk":
        return {"ntk_alignment": r.label_alignment}
    return {}


def _store_meta(job: Mapping[str, Any]) -> dict[str, Any]:
    """What :meth:`RunFiles.store` keys a probe job's result by: the runner probe and the runner's plan."""
    keys = ("step", "params", "max_samples", "call")
    return {"runner": job["probe"].runner_name, **{k: job[k] for k in keys}}


class RunFiles:
    """What a tracker writes into its run folder — checkpoints, metrics rows and the status, inline probe
    results — and what it has written (``written``: ``last_checkpoint``, ``checkpoints_written``,
    ``last_row``, the step up to which ``metrics.csv`` holds every row). Its methods run on the writer thread
    of the training process (:mod:`dynascope.track_writer`), or in the probe worker process on its forked
    copy (:mod:`dynascope.track_worker`)."""

    def __init__(self, run: Run, written: dict[str, Any], device: torch.device, shard: str | None) -> None:
        self.run, self.written, self.device, self.shard = run, written, device, shard

    def checkpoint(
        self, step: int, state: Mapping[str, Tensor], optimizer: Any, row: Mapping[str, Any]
    ) -> None:
        self.run.save_checkpoint(dict(state), step, optimizer=optimizer, metrics=row)
        self.written["last_checkpoint"] = step
        self.written["checkpoints_written"] += 1

    def rows(self, rows: list[dict[str, Any]], status: dict[str, Any] | None) -> None:
        """Append ``rows`` to metrics.csv, then write the status file (with what was written)."""
        if rows:
            self.run.log_metrics(rows)
            self.written["last_row"] = rows[-1]["step"]
        if status is not None:
            text = json.dumps({**status, **self.written, "heartbeat": time.time()}, indent=2) + "\n"
            atomic_write_text(self.run.path / STATUS_FILE, text)

    def store(self, meta: Mapping[str, Any], result: Any) -> dict[str, Any]:
        """Store an inline probe's ``result`` under the runner's key for the checkpoint of ``meta["step"]``;
        returns its scalars for the metrics row."""
        from dynascope.runner import plan, store_result

        name, step = meta["runner"], meta["step"]
        pl = plan(self.run, name, step=step, params=meta["params"], max_samples=meta["max_samples"],
                  device=self.device, shard=self.shard)  # fmt: skip
        if pl.call != meta["call"]:  # never store a number under a key that does not describe it
            raise RuntimeError(f"inline {name} at step {step}: the runner's call {pl.call} != {meta['call']}")
        store_result(pl, result)
        return _probe_metrics(name, result)


# ------------------------------------------------------------------------------------------ the tracker
class _InlineProbe:
    """One inline probe: runner name, parameters, interval (stretched / relaxed by the budget), timings."""

    def __init__(self, name: str, spec: int | Mapping[str, Any], ntk_samples: int) -> None:
        if name not in INLINE_PROBES:
            raise ValueError(f"unknown inline probe {name!r}; choose from {sorted(INLINE_PROBES)}")
        self.name = name
        self.runner_name, defaults = INLINE_PROBES[name]
        params = dict(defaults)
        if isinstance(spec, Mapping):
            spec = dict(spec)
            every = spec.pop("every", None)
            params.update(spec)
        else:
            every = spec
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"inline probe {name!r}: the interval must be a positive int, got {every!r}")
        self.interval = Interval(every)
        self.params = params
        self.max_samples: int | None = ntk_samples if self.runner_name == "ntk" else None
        self.seconds = 0.0
        self.first_seconds: float | None = None  # the first run (cold, outside the budget rule)
        self.runs = 0
        self.skipped = 0  # due runs deferred by the budget or skipped while the worker was busy
        self.planned = 0  # steps so far at the requested interval (what the user asked for)
        self.possible_every: int | None = None  # the interval the tracker can deliver (measured)
        self.cadence_note: str | None = None  # the warning when it is longer than the requested one
        self.worker_seconds = 0.0  # seconds computing in the probe worker (off the training thread)
        self.last_seconds: float | None = None  # the last run's seconds where it ran
        self.previous: Any = None  # last result, for warm starts (inline probes; the worker keeps its own)
        self.warning: str | None = None  # the last warning the probe raised
        self.error: str | None = None  # set when the probe failed: it is switched off

    def due(self, step: int) -> bool:
        return self.error is None and self.interval.due(step)

    def summary(self) -> dict[str, Any]:
        cost = self.interval.cost
        return {
            "probe": self.runner_name, "every": self.interval.every,
            "every_requested": self.interval.requested, "params": self.params,
            "max_samples": self.max_samples, "runs": self.runs, "planned": self.planned, "done": self.runs,
            "skipped": self.skipped,
            "possible_every": self.possible_every, "worker_seconds": round(self.worker_seconds, 6),
            **({"cadence_note": self.cadence_note} if self.cadence_note else {}),
            "seconds": round(self.seconds, 6), "last_cost_seconds": None if cost is None else round(cost, 6),
            "first_run_seconds": None if self.first_seconds is None else round(self.first_seconds, 6),
            **({"last_warning": self.warning} if self.warning else {}),
            **({"error": self.error} if self.error else {}),
        }  # fmt: skip


class Tracker:
    """Write a run folder from your own training loop (module docstring): ``step(step, metrics=...)``
    after each optimizer update, ``close()`` at the end (or use it as a context manager).

    ``run_dir``: the run folder (created; ``overwrite=True`` replaces an existing run). ``model``: the
    ``nn.Module`` being trained. ``data``: a data spec, ``(x, y)`` tensors, a Dataset or a DataLoader (the
    probe batch is its first ``probe_samples`` samples). ``loss``: the loss spec probes use
    (``"cross_entropy"``, ``"mse"``, ``{"name": "token_cross_entropy", "shift": True}``, ...; ``None``: auto).
    ``optimizer``: saved with each checkpoint (``save_optimizer``) and the source of the logged ``lr``.
    ``lr``: an lr schedule dict (:mod:`dynascope.models.schedules`) or a constant stored in run.json.
    ``schedule`` / ``checkpoint_every``: the checkpoint schedule (:func:`dynascope.models.checkpoint_due`).
    ``probes``: ``{name: every}`` or ``{name: {"every": n, **params}}`` (names: :data:`INLINE_PROBES`).
    ``budget``: the most tracker time (probes, checkpoint snapshots, hand-offs, background writes) as a
    fraction of training time (``None``: no limit; the rule is in the module docstring).
    ``background_writes``: write files on a background thread (default) or on the training thread.
    ``probe_worker``: where inline probes run — ``"process"``: a forked child with ``probe_threads`` torch
    threads computes them on a snapshot of the weights while training goes on (:mod:`dynascope.track_worker`);
    ``"inline"``: on the training thread; ``"auto"`` (default): ``"process"`` where it is available (a POSIX
    system, a CPU model, two or more usable cores), else ``"inline"`` (``tracker.json`` records why).
    ``steps``: the planned number of training steps (optional): the cadence warning then states the planned
    and the possible number of probe runs over the whole run.
    ``resume=True`` continues a Tracker run at ``run_dir`` after a crash: the model (and optimizer) get the
    weights (and state) of its last checkpoint, :attr:`start_step` is that step, metrics rows after it and a
    killed writer's temporary files are dropped, and calls for steps up to it are ignored (no duplicate
    rows): continue your loop at ``tracker.start_step + 1``.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        model: nn.Module,
        *,
        data: Any,
        loss: str | Mapping[str, Any] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        lr: float | Mapping[str, Any] | None = None,
        schedule: str | int | Iterable[int] = "log+linear",
        checkpoint_every: int = 100,
        probes: Mapping[str, int | Mapping[str, Any]] | None = None,
        probe_samples: int = 256,
        ntk_samples: int = 32,
        budget: float | None = 0.1,
        model_spec: Mapping[str, Any] | str | None = None,
        save_optimizer: bool = True,
        seed: int = 0,
        notes: str = "",
        extra: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        resume: bool = False,
        heartbeat_s: float = 5.0,
        background_writes: bool = True,
        probe_worker: str = "auto",
        probe_threads: int = 1,
        steps: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
        for name, v in (("probe_samples", probe_samples), ("ntk_samples", ntk_samples)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not 0 < budget):  # fmt: skip
            raise ValueError(f"budget must be a positive fraction of training time or None, got {budget!r}")
        checkpoint_due(0, schedule, every=checkpoint_every)  # validates the schedule
        if probe_worker not in ("auto", "process", "inline"):
            raise ValueError(f"probe_worker must be 'auto', 'process' or 'inline', got {probe_worker!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"steps must be a positive int or None, got {steps!r}")
        if isinstance(probe_threads, bool) or not isinstance(probe_threads, int) or probe_threads < 1:
            raise ValueError(f"probe_threads must be a positive int, got {probe_threads!r}")
        self.steps = steps
        self.model = model
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate / Lightning wrappers
        self.schedule, self.checkpoint_every = schedule, checkpoint_every
        self.budget = float(budget) if budget is not None else None
        self.save_optimizer = save_optimizer
        self.heartbeat_s = float(heartbeat_s)
        self.writer = _is_writer()
        self.collective = is_fsdp(model)  # FSDP2: every rank joins probes and checkpoints (module docstring)
        if self.collective and resume:
            raise ValueError("Tracker: resume=True is not available for an FSDP2-sharded model")
        self.path = Path(run_dir)
        self.run: Run | None = None
        self.closed = False
        self._probes = [_InlineProbe(n, s, ntk_samples) for n, s in (probes or {}).items()]
        self._rows: dict[int, dict[str, Any]] = {}
        self._last_step: int | None = None
        self._last_checkpoint: int | None = None  # the last checkpoint handed to the writer
        self._written: dict[str, Any] = {"last_checkpoint": None, "checkpoints_written": 0, "last_row": None}
        self._budget = OverheadBudget(self.budget)
        self._setup_s = self._close_s = 0.0
        self._resumed_at: float | None = None
        self._last_flush = _clock()
        self._skipped: collections.deque[dict[str, Any]] = collections.deque(maxlen=SKIPPED_KEPT)
        self._relaxed: list[dict[str, Any]] = []
        self._writer: Writer | None = None
        self._worker: ProbeWorker | None = None
        self._inflight: dict[str, Any] | None = None  # the probe job the worker is computing
        self._files: RunFiles | None = None
        self._background_writes = background_writes
        # training intervals (end, seconds) while the worker computes, and those while it is idle (sum, n)
        self._worker_steps: list[tuple[float, float]] = []
        self._idle_steps = [0.0, 0]
        self._worker_runs = 0
        self._raw_interference = 0.0
        self._timed_steps = 0  # training intervals timed (for the cadence estimate)
        self.probe_worker = "inline"
        self.probe_worker_note: str | None = None
        self._started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self._pid = os.getpid()  # a forked child (e.g. a DataLoader worker) never writes
        self.start_step: int | None = None  # the step a resumed run continues after
        if not self.writer:
            if self.collective:
                self._join_rank0()
            return
        if resume and overwrite:
            raise ValueError("Tracker: resume=True continues a run, overwrite=True replaces it; pass one")
        t0 = time.perf_counter()
        self._setup(data, loss, lr, probe_samples, model_spec, seed, notes, extra, overwrite, resume)
        from dynascope.runner import call_params

        for p in self._probes:  # unknown parameters fail here, not at the first due step
            call_params(self.run, p.runner_name, p.params)
        self._files = RunFiles(self.run, self._written, self._device, "fsdp" if self.collective else None)
        if self._probes and self.collective:
            self.probe_worker_note = "a sharded model's probes are collectives, run on the training thread"
        elif self._probes:  # forked before any thread starts
            self._start_worker(probe_worker, probe_threads)
        if self._worker is not None:  # the worker writes the run too: no thread in the training process
            weakref.finalize(self, self._worker.close).atexit = False
            self._worker.flush([], self._status("running"), 0)
        else:
            self._start_writer()
        if self.collective:
            self._join_rank0()
        self._setup_s = time.perf_counter() - t0
        ref = weakref.ref(self)
        atexit.register(lambda: (t := ref()) is not None and not t.closed and t.close())

    # ------------------------------------------------------------------ setup
    def _setup(
        self, data, loss, lr, probe_samples, model_spec, seed, notes, extra, overwrite, resume
    ) -> None:
        path = self.path
        resume = resume and Run.is_run(path)
        if overwrite and Run.is_run(path):  # the files a tracker adds to a run (Run.create clears the rest)
            import shutil

            from dynascope.store import STORE_FILENAME

            for name in (STATUS_FILE, PROBE_DATA_FILE, STORE_FILENAME):
                (path / name).unlink(missing_ok=True)
            shutil.rmtree(path / HF_CONFIG_DIR, ignore_errors=True)
        from dynascope.datasets.batching import input_count, map_inputs, slice_inputs

        data_spec: dict[str, Any] | None = None
        batch: tuple[Any, Tensor] | None = None
        given_spec = isinstance(data, str) or (
            isinstance(data, Mapping) and not any(isinstance(v, Tensor) for v in data.values())
        )  # a dict of tensors (an HF-style batch) is data, not a spec
        if given_spec:
            from dynascope.datasets.specs import load_spec, normalize_data_spec

            data_spec = normalize_data_spec(data)
            x, y = load_spec(data_spec).train
            self._max_samples = probe_samples if probe_samples < y.shape[0] else None
            batch = (slice_inputs(x, slice(None, probe_samples)), y[:probe_samples])
        else:
            batch = _first_samples(data, probe_samples)
            self._max_samples = None
            data_spec = {"file": str((path / PROBE_DATA_FILE).resolve())}
            tensors, x_keys = _probe_tensors(*batch)
            if x_keys != "x":
                data_spec["x"] = x_keys
        spec, spec_info, write_model_files = self._model_spec(model_spec, batch[0])
        frozen = [n for n, p in _unwrap_model(self.model).named_parameters() if not p.requires_grad]
        if frozen and not any(k in spec for k in ("trainable", "frozen")):
            spec = {**spec, "frozen": frozen}  # the run's readers freeze the same parameters
            spec_info["frozen"] = f"{len(frozen)} frozen parameter tensor(s) recorded in the spec"
        lr_schedule = None
        if isinstance(lr, Mapping):
            lr_schedule = dict(lr)
        elif lr is not None:
            lr_schedule = {"type": "constant", "lr": float(lr)}
        n_probe = input_count(batch[0])
        info = {
            "model_spec": spec_info,
            "schedule": self.schedule if isinstance(self.schedule, (str, int)) else sorted(self.schedule),
            "checkpoint_every": self.checkpoint_every,
            "probe_samples": n_probe,
            "probe_data": f"the data spec's first {n_probe} training samples"
            if given_spec
            else f"the first {n_probe} samples given, saved to {PROBE_DATA_FILE} (the run's data spec)",
        }
        if resume:
            self.run = self._resume(spec)
        else:
            self.run = Run.create(
                path, model=spec, dataset=data_spec, optimizer=self.optimizer, lr_schedule=lr_schedule,
                seed=seed, notes=notes, loss=loss, extra={**dict(extra or {}), "tracker": info},
                overwrite=overwrite,
            )  # fmt: skip
        if data_spec.get("file") == str((path / PROBE_DATA_FILE).resolve()):
            from safetensors.torch import save_file

            from dynascope.models.atomic import atomic_write

            atomic_write(path / PROBE_DATA_FILE, lambda tmp: save_file(tensors, tmp))
        if write_model_files is not None:  # an HF config, an exported program: into the run folder now
            write_model_files()
        self._check_reopenable(spec_info)
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        self._device = device
        self._batch = (map_inputs(batch[0], lambda t: t.to(device)), batch[1].to(device))

    def _join_rank0(self) -> None:
        """Every rank of a sharded model, once rank 0 has set the run up: rank 0's probe batch and
        ``max_samples``; the other ranks open the run (for its probe parameters)."""
        box = [(self._batch, self._max_samples) if self.writer else None]
        torch.distributed.broadcast_object_list(box, src=0)
        if not self.writer:
            from dynascope.datasets.batching import map_inputs

            self._device = next(p.device for p in self.model.parameters())
            (x, y), self._max_samples = box[0]  # type: ignore[misc]
            self._batch = (map_inputs(x, lambda t: t.to(self._device)), y.to(self._device))  # dicts too
            self.run = Run.open(self.path)

    def _resume(self, spec: Mapping[str, Any]) -> Run:
        """Open the Tracker run at ``self.path`` to continue after its last checkpoint (class docstring)."""
        run = Run.open(self.path)
        if "tracker" not in run.extra:
            raise RunError(self.path, "was not written by a Tracker; resume=True continues a Tracker run")
        if {k: v for k, v in run.model_config.items() if k != "seed"} != {
            k: v for k, v in spec.items() if k != "seed"
        }:
            raise RunError(
                self.path,
                f"holds a run of another model ({run.model_config}, not {dict(spec)}); nothing was changed",
            )
        run.remove_orphans()  # this process is the run's writer now
        checkpoints = run.checkpoints()
        logged = run.metrics()["step"]
        if len(logged):  # a kill between a checkpoint and its metrics row: resume where both exist
            checkpoints = [c for c in checkpoints if c.step <= int(logged.max())] or checkpoints[:1]
        if checkpoints:
            last = checkpoints[-1]
            load_weights(last.path, _unwrap_model(self.model))
            if self.optimizer is not None and last.optimizer_path is not None:
                run.load_optimizer_state(last.step, self.optimizer, _unwrap_model(self.model))
            self.start_step = last.step
            self._last_step = self._last_checkpoint = last.step
            self._written.update(last_checkpoint=last.step, checkpoints_written=len(checkpoints))
        run.truncate_metrics(self.start_step if self.start_step is not None else -1)
        return run

    def _model_spec(
        self, given: Any, example: Any
    ) -> tuple[dict[str, Any], dict[str, Any], Callable[[], None] | None]:
        """``(spec, info, write)``: the model spec of the run (module docstring) and what writes the files
        it names into the run folder once it exists (``None``: nothing to write). ``example``: the probe
        batch's inputs (an exported program is traced on its first samples)."""
        from dynascope.models import model_config, normalize_model_spec

        model = _unwrap_model(self.model)
        if given is not None:
            return normalize_model_spec(given), {"source": "model_spec="}, None
        try:
            return model_config(model), {"source": "dynascope model config"}, None
        except ValueError:
            pass
        from dynascope.models.structure import StructureError, describe_module, plain_class

        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "save_pretrained") and hasattr(model, "save_pretrained"):
            folder = str((self.path / HF_CONFIG_DIR).resolve())
            config = copy.deepcopy(config)
            # the task head, as model.save_pretrained records (an FSDP2-sharded model: its own class)
            config.architectures = [plain_class(type(model)).__name__]
            return (
                {"hf": folder, "seed": 0},
                {"source": f"Hugging Face config saved to {HF_CONFIG_DIR}/"},
                lambda: config.save_pretrained(folder),
            )
        try:  # a Sequential of torch.nn layers (e.g. defined inline in a notebook) travels as data
            return describe_module(model), {"source": "the model's torch.nn structure"}, None
        except StructureError as e:
            not_structure = str(e)
        cls = plain_class(type(model))  # an FSDP2-sharded module: its own class
        ref = _class_ref(cls)
        if ref is None:  # a class no reader can import: the architecture travels as an exported program
            exported = ("its parameters are FSDP2 shards; export needs the whole model in one process"
                        if self.collective else self._export(model, example))
            if isinstance(exported, tuple):
                return exported
            raise ValueError(
                f"Tracker: the model's class {cls.__qualname__} (module {cls.__module__}) "
                "cannot be imported by a reader of the run (it is defined in __main__ or inside a function), "
                f"it is not a Sequential of torch.nn layers ({not_structure}), and torch.export cannot "
                f"carry it ({exported}); pass model_spec={{'factory': 'pkg.module:make_model', 'kwargs': "
                "{...}} (or a file path 'path/to/file.py:make_model')"
            )
        kwargs = {}
        source = "the model's class"
        hp = getattr(model, "hparams", None)
        if hp is not None and len(hp):
            kw = _jsonable_kwargs(hp)
            if kw is not None:
                kwargs, source = kw, "the model's class and its hparams"
        return normalize_model_spec({"factory": ref, "kwargs": kwargs}), {"source": source}, None

    def _export(self, model: nn.Module, example: Any) -> tuple[dict[str, Any], dict[str, Any], Any] | str:
        """The exported-program route (:mod:`dynascope.models.exported`): the spec triple, or why not (also
        warned: the caller falls back to the spec route)."""
        import shutil
        import tempfile

        from dynascope.datasets.batching import input_count, slice_inputs
        from dynascope.models.exported import EXPORT_FILE, ExportError, export_model, tensors_file

        n = min(input_count(example), 8)
        if n < 2:
            why = "the probe batch has fewer than 2 samples (the batch dimension is exported as dynamic)"
        else:
            tmp = Path(tempfile.mkdtemp(prefix="dynascope-export-"))
            try:
                export_model(model, slice_inputs(example, slice(None, n)), tmp / EXPORT_FILE)
                target = self.path / EXPORT_FILE

                def write() -> None:
                    for f in (tmp / EXPORT_FILE, tensors_file(tmp / EXPORT_FILE)):
                        shutil.move(str(f), str(self.path / f.name))
                    shutil.rmtree(tmp, ignore_errors=True)

                info = {"source": f"the model exported with torch.export to {EXPORT_FILE} (eval mode)"}
                return {"exported": str(target.resolve()), "seed": 0}, info, write
            except ExportError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                why = str(e)
        warnings.warn(
            f"Tracker '{self.path}': the model cannot travel as an exported program ({why}); falling back "
            "to the spec route",
            UserWarning,
            stacklevel=5,
        )
        return why

    def _check_reopenable(self, info: dict[str, Any]) -> None:
        """Build the run's model spec once; record whether its parameters match the tracked model's."""
        assert self.run is not None
        from dynascope.models import build_from_spec

        mine = {k: tuple(v.shape) for k, v in _unwrap_model(self.model).state_dict().items()}
        try:
            built = build_from_spec(self.run.model_config)
            theirs = {k: tuple(v.shape) for k, v in built.state_dict().items()}
            ok = theirs == mine
            why = None if ok else (
                "the spec builds a model with other parameters (missing "
                f"{sorted(set(mine) - set(theirs))[:5]}, unexpected {sorted(set(theirs) - set(mine))[:5]}, "
                "or other shapes)"
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - any failure means: not reopenable, say why
            ok, why = False, f"building the spec failed ({type(e).__name__}: {e})"
        info["reopenable"] = ok
        if not ok:
            info["note"] = (
                f"{why}; the run's checkpoints can only be re-opened with a spec that builds this model: "
                "create the Tracker with model_spec=... ({'factory': 'pkg.module:make', 'kwargs': {...}})"
            )
            warnings.warn(f"Tracker '{self.path}': {info['note']}", UserWarning, stacklevel=4)
        self.run.config["extra"]["tracker"]["model_spec"] = info
        self.run.save_config()

    def _start_writer(self) -> None:
        """The writer thread (the files are written in this process: no probe worker, or it died)."""
        self._writer = Writer(threaded=self._background_writes)
        stop = weakref.finalize(self, self._writer.close)  # a tracker dropped without close() stops it
        stop.atexit = False  # at exit, close() (registered in __init__) drains the writer itself
        self._writer.flush([], self._status("running"), self._files.rows)

    def _start_worker(self, mode: str, threads: int) -> None:
        """Fork the probe worker (``mode`` "process", or "auto" where available); else probes run inline."""
        from dynascope.runner import PROBES

        if mode == "inline":
            return
        why = process_available(_unwrap_model(self.model))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if why is None and mode == "auto" and cores < 2:
            why = "this process may use one CPU core only: a worker would compete with training for it"
        if why is None:
            fns = {p.runner_name: PROBES[p.runner_name].resolve() for p in self._probes}
            try:
                self._worker = ProbeWorker(_unwrap_model(self.model), self._batch, fns, threads=threads,
                                           files=self._files, wait_writes=not self._background_writes,
                                           nice=PROBE_NICE if self.budget is not None else 0)
                self.probe_worker = "process"
                return
            except (OSError, ValueError) as e:
                why = f"starting it failed ({type(e).__name__}: {e})"
        if mode == "process":
            raise ValueError(f"Tracker: probe_worker='process' is not available: {why}")
        self.probe_worker_note = f"inline probes run on the training thread: {why}"

    # ------------------------------------------------------------------ the per-step call
    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(error=None if exc is None else f"{type(exc).__name__}: {exc}")

    def current_lr(self) -> float | None:
        """The optimizer's current learning rate (first param group), or the run's schedule at the step."""
        if self.optimizer is not None and self.optimizer.param_groups:
            lr = self.optimizer.param_groups[0].get("lr")
            if isinstance(lr, Tensor):
                lr = float(lr)
            return float(lr) if isinstance(lr, (int, float)) else None
        return None

    def log(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Record metrics at ``step`` (merged into that step's row of ``metrics.csv``) without probing."""
        if not self.writer or self.closed or (self.start_step is not None and step <= self.start_step):
            return  # a resumed run already holds the rows up to its last checkpoint
        row = self._rows.setdefault(int(step), {"step": int(step)})
        for k, v in (metrics or {}).items():
            v = _scalar(v)
            if v is not None and k != "step":
                row[str(k)] = v

    def step(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Call after optimizer update number ``step`` (0 for the initial weights): logs ``metrics``,
        hands the checkpoint to the writer when the schedule says so, runs the due inline probes the budget
        admits (module docstring). Raises ``RunError`` when a background write failed."""
        if not (self.writer or self.collective) or self.closed or os.getpid() != self._pid:
            return
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"Tracker.step: step must be a non-negative int, got {step!r}")
        start = _clock()
        if self._resumed_at is not None:
            self._budget.add_train(start - self._resumed_at)
            if self._inflight is not None:  # classified once the worker says when it finished
                if len(self._worker_steps) < 100_000:  # (a worker that never answers: memory stays bounded)
                    self._worker_steps.append((start, start - self._resumed_at))
            elif self._worker is not None:
                self._idle_steps[0] += start - self._resumed_at
                self._idle_steps[1] += 1
        parts = 0.0  # seconds of this call booked as checkpoint or probe time; the rest is "write"
        try:
            self._raise_write_errors()
            if self._last_step is not None and step <= self._last_step:
                self.log(step, metrics)  # e.g. gradient accumulation: one update, several calls
                return
            self._last_step = step
            if self._resumed_at is not None:
                self._timed_steps += 1
            if self._worker is not None and (self._worker.closed or any(p.due(step) for p in self._probes)):
                self._collect(0.0)  # the worker's replies are read when a probe is due (or at a flush)
            for p in self._probes:
                if p.error is None and step % p.interval.requested == 0:
                    p.planned += 1
            lr = self.current_lr()
            self.log(step, {**({"lr": lr} if lr is not None else {}), **dict(metrics or {})})
            if self._writer is not None and self._writer.threaded:  # inline writes are already in `own`
                self._budget.background = self._writer.cpu_seconds
            due = self._admit(step)
            scheduled = checkpoint_due(step, self.schedule, every=self.checkpoint_every)
            ck = 0.0
            if due or scheduled:
                t0 = _clock()
                self._checkpoint(step)
                ck = _clock() - t0
                self._budget.add_own("checkpoint", ck)
                parts += ck
            jobs: list[dict[str, Any]] = []  # probe jobs for the worker (one hand-off of the snapshot)
            t_jobs = _clock()
            for p in due:
                t0 = _clock()
                job = self._run_probe(p, step, lr)  # inline: computes it; with the worker: the job
                if job is None:
                    parts += self._charge(p, step, _clock() - t0, 0.0 if scheduled else ck)
                else:
                    jobs.append(job)
            if jobs:
                self._submit(step, jobs)
                dt = (_clock() - t_jobs) / len(jobs)
                share = self._budget.interference / max(self._worker_runs, 1) / len(jobs)  # a run's mean
                for job in jobs:
                    ck_share = 0.0 if scheduled else ck / len(jobs)
                    parts += self._charge(job["probe"], step, dt, ck_share + share)
            if self.writer and (due or scheduled or _clock() - self._last_flush >= self.heartbeat_s):
                self._flush(upto=step)  # this step's row stays open for log() calls after step()
        finally:
            end = _clock()
            self._budget.add_own("write", end - start - parts)
            self._resumed_at = end

    def _charge(self, p: _InlineProbe, step: int, seconds: float, extra: float) -> float:
        """Book ``seconds`` of ``p`` on the training thread; its cost for the budget adds ``extra``: the
        checkpoint written for it (0 when the schedule wrote one anyway) and, in the worker, a run's mean
        interference. Returns ``seconds``."""
        p.seconds += seconds
        if p.first_seconds is None:
            p.first_seconds = seconds
        p.interval.cost = seconds + extra
        self._budget.add_own("probe", seconds)
        if self._budget.relax(p.interval):
            self._relaxed.append({"step": step, "probe": p.name, "every": p.interval.every})
        return seconds

    def _admit(self, step: int) -> list[_InlineProbe]:
        """The due probes the budget admits at ``step``; the deferred ones are recorded in ``skipped``."""
        out: list[_InlineProbe] = []
        planned = 0.0
        for p in self._probes:
            if not p.due(step):
                continue
            if self.collective:  # every rank must take the same decision: no deferral
                out.append(p)
                continue
            run, reason = self._budget.decide(p.interval, planned, stretch=self._worker is None)
            if run and self._inflight is not None and self.budget is not None:
                run, reason = False, f"the probe worker is still computing step {self._inflight['step']}"
            if run:
                out.append(p)
                planned += p.interval.cost or 0.0
            else:
                if p.last_seconds is not None:  # the cadence it can keep, with the budget it has now
                    self._check_cadence(p, p.last_seconds)
                self._skipped.append(
                    {"step": step, "probe": p.name, "every": p.interval.every, "reason": reason}
                )
                p.skipped += 1
        return out

    def _checkpoint(self, step: int) -> None:
        """Snapshot weights (and optimizer state) to CPU now; the writer (or the worker) writes them."""
        from dynascope.models.runs import optimizer_state_by_name

        model = _unwrap_model(self.model)
        if not self.writer:  # a sharded model: this rank's part of the collective gather
            _cpu_state_dict(model)
            self._last_checkpoint = step
            return
        assert self.run is not None and self._files is not None
        row = {k: v for k, v in self._rows.get(step, {}).items() if k != "step"}
        opt = self.optimizer if self.save_optimizer and not self.collective else None
        if self._worker is not None:  # copied into one buffer and sent; the worker writes it
            named = optimizer_state_by_name(opt, model) if opt is not None else None
            self._worker.checkpoint(step, model.state_dict(), named, row)
            self._last_checkpoint = step
            return
        assert self._writer is not None
        files = self._files

        def snapshot() -> Callable[[], None]:
            state = _cpu_state_dict(model)
            named = optimizer_state_by_name(opt, model) if opt is not None else None  # CPU copies
            return lambda: files.checkpoint(step, state, named, row)

        nbytes = sum(
            t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, Tensor)
        )
        if opt is not None:  # optimizer state: tensors per parameter (exp_avg, momentum_buffer, ...)
            nbytes += sum(
                v.numel() * v.element_size()
                for st in opt.state.values()
                for v in st.values()
                if isinstance(v, Tensor)
            )
        self._writer.submit_checkpoint(snapshot, nbytes)
        self._last_checkpoint = step

    def _run_probe(self, p: _InlineProbe, step: int, lr: float | None) -> dict[str, Any] | None:
        """Compute ``p`` at ``step`` on the in-memory model (returns ``None``), or with the probe worker
        return its job for :meth:`_submit`; :meth:`_finish` stores the result under the runner's key for the
        checkpoint of ``step``."""
        from dynascope.runner import call_params, schedule_lr

        assert self.run is not None
        params = dict(p.params)
        if p.runner_name == "sharpness" and "lr" not in params:
            # η of the optimizer now; without one, the run's schedule (as the runner's plan fills it)
            params["lr"] = lr if lr is not None and lr >= 0 else schedule_lr(self.run, step)
        max_samples = p.max_samples if p.max_samples is not None else self._max_samples
        if p.max_samples is not None and self._max_samples is not None:
            max_samples = min(p.max_samples, self._max_samples)
        call = call_params(self.run, p.runner_name, params)
        n = max_samples if max_samples is not None else self._batch[1].shape[0]
        job = {"probe": p, "step": step, "params": params, "call": call, "max_samples": max_samples, "n": n}
        if self._worker is not None:
            return job
        self._compute_inline(job)
        return None

    def _compute_inline(self, job: dict[str, Any]) -> None:
        """Compute ``job`` on the training thread with the in-memory model and :meth:`_finish` it."""
        from dynascope.datasets.batching import slice_inputs
        from dynascope.runner import PROBES

        p, n = job["probe"], job["n"]
        kwargs = dict(job["call"])
        if p.previous is not None and "v0" in PROBES[p.runner_name].parameters():
            kwargs["v0"] = p.previous
        data = (slice_inputs(self._batch[0], slice(None, n)), self._batch[1][:n])
        if self.collective:  # this rank's contiguous part of the batch
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
            part = slice(n * rank // world, n * (rank + 1) // world)
            data = (slice_inputs(data[0], part), data[1][part])
        fn = PROBES[p.runner_name].resolve()
        self._finish(job, compute_probe(fn, _unwrap_model(self.model), data, kwargs, device=self._device))

    def _submit(self, step: int, jobs: list[dict[str, Any]]) -> None:
        """Hand the due probe ``jobs`` to the worker, on the weights of the checkpoint of ``step`` it has
        (waiting for its previous jobs first: only ``budget=None`` admits probes while it is busy)."""
        assert self._worker is not None
        self._collect(math.inf)
        if self._worker is None:  # it stopped while we waited: these jobs run on the training thread
            for job in jobs:
                self._compute_inline(job)
            return
        specs = [(j["probe"].name, j["probe"].runner_name, j["call"], j["n"], _store_meta(j)) for j in jobs]
        self._worker.submit(step, specs)
        self._inflight = {"step": step, "jobs": {j["probe"].name: j for j in jobs}}

    def _collect(self, timeout: float) -> None:
        """Finish the worker's jobs if they are done (waiting up to ``timeout`` seconds); after the worker
        died, hand what it had not written to the writer thread (:meth:`_worker_died`)."""
        if self._worker is None:
            return
        done = self._worker.poll(timeout) if self._inflight is not None else None
        if done is not None:
            inflight, self._inflight = self._inflight, None
            step, outcomes = done
            self._interference(self._worker.done_at if not self._worker.closed else _clock())
            assert step == inflight["step"]
            for name, out in outcomes:
                if self._worker.closed:  # lost with the worker: skipped, the probe stays on
                    p = inflight["jobs"][name]["probe"]
                    p.skipped += 1
                    self._skipped.append({"step": step, "probe": name, "every": p.interval.every,
                                          "reason": str(out.error)})  # fmt: skip
                else:
                    self._finish(inflight["jobs"][name], out)
        if self._worker.closed and self._inflight is None and not self.closed:
            self._worker_died()

    def _interference(self, done_at: float | None) -> None:
        """Charge the slowdown of the training steps taken while the worker computed (ended before
        ``done_at``) against the mean idle step (:mod:`dynascope.track_budget`); later ones were idle."""
        busy = [dt for end, dt in self._worker_steps if done_at is None or end - dt < done_at]
        for _, dt in self._worker_steps[len(busy) :]:  # in time order: the busy ones come first
            self._idle_steps[0] += dt
            self._idle_steps[1] += 1
        self._worker_steps.clear()
        self._worker_runs += 1
        total, n = self._idle_steps
        if n >= 10 and busy:  # a baseline to compare with
            self._raw_interference += sum(busy) - len(busy) * total / n  # noise of either sign
            self._budget.interference = max(self._raw_interference, 0.0)

    def _worker_died(self) -> None:
        """The worker process died: the checkpoints and rows it had not written are written here (a row
        already in ``metrics.csv`` is not appended twice), later writes go to a writer thread and later
        probes run on the training thread."""
        assert self._worker is not None and self.run is not None
        checkpoints, rows = self._worker.lost()
        self._written.update(self._worker.written)
        self._worker, self.probe_worker = None, "inline"
        self.probe_worker_note = "the probe worker stopped; later probes ran on the training thread"
        self._start_writer()
        assert self._writer is not None and self._files is not None
        files = self._files
        for step, state, optimizer, row in checkpoints:
            self._writer.submit(lambda s=step, st=state, o=optimizer, r=row: files.checkpoint(s, st, o, r))
        self._writer.drain()
        logged = self.run.metrics()["step"]
        last = max(int(logged.max()) if len(logged) else -1, self._written.get("last_row") or -1)
        for row in rows:
            if row["step"] > last:
                self._rows.setdefault(int(row["step"]), {}).update(row)

    def _finish(self, job: dict[str, Any], out: ProbeOutcome) -> None:
        """Store a probe's result (through the writer, after its checkpoint), log its scalars in the step's
        metrics row, warm-start the next run (the worker did these itself: ``out.stored``), check the
        cadence the probe can keep."""
        p, step = job["probe"], job["step"]
        if self.probe_worker == "process":
            p.worker_seconds += out.seconds
        result = out.result
        if result is None:
            p.error = f"step {step}: {out.error}"
            warnings.warn(
                f"Tracker '{self.path}': inline probe {p.name!r} failed at step {step} and is switched off "
                f"({p.error}); tracker.json records it",
                UserWarning,
                stacklevel=4,
            )
            return
        if out.warning:  # recorded once per probe in tracker.json instead of repeated in the user's log
            p.warning = f"step {step}: {out.warning}"
        if not out.stored:
            meta = _store_meta(job)
            files = self._files
            if self._writer is not None and files is not None:  # rank 0
                self._writer.submit(lambda: files.store(meta, result))
            p.previous = warm_start(p.runner_name, result)
            self._rows.setdefault(step, {"step": step}).update(_probe_metrics(p.runner_name, result))
        p.runs += 1
        p.last_seconds = out.seconds
        self._check_cadence(p, out.seconds)

    def _check_cadence(self, p: _InlineProbe, seconds: float) -> None:
        """Estimate the interval ``p`` can keep (``possible_every``; ``None``: none) from its last run's
        ``seconds``, its training-thread ``cost`` (with the checkpoint written for it) and the mean training
        step ``step_s``; warn once (after its first, cold run) when it is longer than the requested one.

        The budget's room for probes is ``budget − fixed``, ``fixed`` the fraction of training time the
        rest of the tracker (scheduled checkpoints, metric rows, status) takes. In the worker a run occupies
        it for ``seconds / step_s`` steps and uses ``cost / (room · step_s)`` steps of budget: the next due
        multiple of ``requested`` after the larger; inline, a run needs ``seconds / (room · step_s)`` steps,
        rounded up to ``requested · 2^j`` (intervals double)."""
        if self._timed_steps < 2 or self._budget.train <= 0:
            return
        step_s = self._budget.train / self._timed_steps
        req = p.interval.requested
        fixed = self._budget.fixed / self._budget.train
        room = None if self.budget is None else self.budget - fixed
        every: int | None
        if room is None:  # every due run happens (training waits for the worker if need be)
            every = req
        elif room <= 0:
            every = None
        elif self.probe_worker == "process":
            need = max(seconds / step_s, (p.interval.cost or 0.0) / (room * step_s))
            every = req * max(1, math.ceil(need / req))
        else:
            ratio = max(seconds / (room * step_s * req), 1e-12)
            every = req * 2 ** max(0, math.ceil(math.log2(ratio)))
        p.possible_every = every
        if (every is not None and every <= req) or p.cadence_note is not None or p.runs + p.skipped < 2:
            return
        where = (
            f"the probe worker ({self._worker.threads if self._worker else 1} thread(s))"
            if self.probe_worker == "process"
            else f"the training thread under budget {self.budget:g}"
        )
        per = f"over {self.steps} steps" if self.steps else "per 1000 steps"
        span = self.steps if self.steps else 1000
        last = self._last_step

        def runs(interval: int, so_far: int) -> int:
            """Runs every ``interval`` over the run: those so far and those left up to ``steps=`` (before any
            step, step 0's too); per 1000 steps without ``steps=``."""
            if not self.steps:
                return span // interval
            if last is None:
                return span // interval + 1
            return so_far + max(span // interval - last // interval, 0)

        planned = f"planned {runs(req, p.planned)} runs {per}"
        if every is None:
            p.cadence_note = (
                f"{p.name} every {req} steps was requested ({planned}); the rest of the tracker (scheduled "
                f"checkpoints, metric rows) already takes {fixed:.1%} of training time, over the budget "
                f"{self.budget:g}, so it runs only when the budget has room: a sparser checkpoint schedule, "
                "a larger budget or budget=None delivers it"
            )
        else:
            p.cadence_note = (
                f"{p.name} every {req} steps was requested; one run takes {seconds:.3g} s on {where} and a "
                f"training step {step_s:.3g} s, and the budget leaves {room:.1%} of training time for "
                f"probes, so it can run about every {every} steps ({planned}, possible about "
                f"{runs(every, p.runs)})"
            )
        warnings.warn(f"Tracker '{self.path}': {p.cadence_note}", UserWarning, stacklevel=4)

    # ------------------------------------------------------------------ writing
    @property
    def _writes(self) -> bool:
        """This process writes the run (rank 0, set up): through the worker or the writer thread."""
        return self._files is not None and (self._writer is not None or self._worker is not None)

    def _flush(self, upto: int | None = None) -> None:
        """Hand the metrics rows of steps before ``upto`` (all when None) and the status to the writer (the
        worker holds back the rows from the step of a probe it computes: its scalars join that row)."""
        assert self._files is not None
        if self._worker is not None:
            self._collect(0.0)  # the probes' done counts in the status are current
        rows = [self._rows.pop(s) for s in sorted(self._rows) if upto is None or s < upto]
        if self._worker is not None:
            last = max([self._last_step or 0, *(r["step"] for r in rows)])
            self._worker.flush(rows, self._status("running"), upto if upto is not None else last + 1)
        else:
            assert self._writer is not None
            self._writer.flush(rows, self._status("running"), self._files.rows)
        self._last_flush = _clock()

    def _written_now(self) -> dict[str, Any]:
        return {**self._written, "heartbeat": time.time()}

    def flush(self) -> None:
        """Write every buffered metrics row and the status file now (waits for the probe worker's result,
        whose scalars join its step's row, and for the writer)."""
        if not self.writer or self.run is None or self.closed or not self._writes:
            return
        self._collect(math.inf)
        self._flush(None)
        if self._worker is not None:
            self._worker.sync()
            self._written.update(self._worker.written)
            self._collect(0.0)  # a worker that died meanwhile: its writes are made here
        if self._writer is not None:
            self._writer.drain()
        self._raise_write_errors()

    def _raise_write_errors(self) -> None:
        errors = self._writer.errors() if self._writer is not None else []
        if self._worker is not None:
            errors += self._worker.errors()
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise RunError(self.path, f"the tracker's background write failed: {errors[0]}{more}")

    @property
    def overhead(self) -> dict[str, Any]:
        """Seconds spent training (between calls) and in the tracker on the training thread (probes,
        checkpoint snapshots and hand-offs, writes), its fraction of training time, the budget, the
        background writer's busy and CPU seconds, setup and close seconds, and ``over_budget``."""
        b = self._budget
        train = b.train
        return {
            **b.summary(),
            "probe_seconds": round(b.own["probe"], 6), "checkpoint_seconds": round(b.own["checkpoint"], 6),
            "write_seconds": round(b.own["write"], 6),
            "probe_fraction": b.own["probe"] / train if train > 0 else None,
            "background_write_seconds": round(self._writer.busy_seconds, 6) if self._writer else 0.0,
            "background_write_cpu_seconds": round(self._writer.cpu_seconds, 6) if self._writer else 0.0,
            "worker_wait_seconds": round(self._worker.wait_seconds, 6) if self._worker else 0.0,
            "worker_interference_seconds": round(b.interference, 6),
            "setup_seconds": round(self._setup_s, 6), "close_seconds": round(self._close_s, 6),
            "over_budget": b.over_budget(),
        }  # fmt: skip

    def status_probes(self) -> dict[str, dict[str, Any]]:
        """Each inline probe's summary as in ``tracker.json`` (interval, runs, seconds, first run's cost)."""
        return {p.name: p.summary() for p in self._probes}

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """Inline probe runs deferred by the overhead budget: ``{"step", "probe", "every", "reason"}``."""
        return list(self._skipped)

    @property
    def relaxed(self) -> list[dict[str, Any]]:
        """Stretched intervals halved again by the budget: ``{"step", "probe", "every"}``."""
        return list(self._relaxed)

    def _status(self, state: str, error: str | None = None) -> dict[str, Any]:
        """The status (``tracker.json``) as the training thread sees it; the writer adds what it wrote."""
        status = {
            "schema": STATUS_SCHEMA, "state": state, "pid": os.getpid(), "host": socket.gethostname(),
            "started": self._started, "step": self._last_step,
            "probes": self.status_probes(), "overhead": self.overhead, "planned_steps": self.steps,
            "probe_worker": self.probe_worker,
            **({"worker_pid": self._worker.pid} if self._worker is not None else {}),
            **({"probe_worker_note": self.probe_worker_note} if self.probe_worker_note else {}),
            "skipped": list(self._skipped), "relaxed": list(self._relaxed),
        }  # fmt: skip
        if error:
            status["error"] = error
        return status

    def _write_status_now(self, state: str, error: str | None = None) -> None:
        atomic_write_text(
            self.path / STATUS_FILE,
            json.dumps({**self._status(state, error), **self._written_now()}, indent=2) + "\n",
        )

    def close(self, error: str | None = None) -> None:
        """Checkpoint the last step (if not yet saved), write every row, wait for the writer, mark the run
        finished (or failed). Raises ``RunError`` when a background write failed."""
        if self.closed or os.getpid() != self._pid:
            return
        if not (self.writer and self.run is not None and self._writes):
            if self.collective and self._last_step is not None and self._last_checkpoint != self._last_step \
                    and error is None:  # join rank 0's last checkpoint (a collective gather)
                self._checkpoint(self._last_step)
            self.closed = True
            return
        t0 = time.perf_counter()
        try:
            if self._last_step is not None and self._last_checkpoint != self._last_step and error is None:
                self._checkpoint(self._last_step)
            self._collect(self._close_wait(error))  # the result the worker is computing
            self._flush(None)
        finally:
            self.closed = True
            errors = []
            if self._worker is not None:  # it writes everything it was sent, then exits
                drop = self._inflight is not None and error is None  # the budget had no room to wait
                if drop:
                    assert self._inflight is not None
                    for name, job in self._inflight["jobs"].items():
                        job["probe"].skipped += 1
                        self._skipped.append({"step": self._inflight["step"], "probe": name,
                                              "every": job["probe"].interval.every,
                                              "reason": "the run closed; waiting for the worker would exceed "
                                                        "the budget"})  # fmt: skip
                    self._inflight = None
                self._worker.close(drop=drop)
                self._written.update(self._worker.written)
                errors += self._worker.errors()
                if self._worker.unwritten:  # it died first: what it had not written is written here
                    self._worker_died()
                    self._flush(None)
            if self._writer is not None:
                self._writer.close()
                errors += self._writer.errors()
            if errors and error is None:
                error = f"background write failed: {errors[0]}"
            self._close_s = time.perf_counter() - t0
            self._write_status_now("failed" if error else "finished", error)
            self._record_cadence()
        if errors:
            raise RunError(self.path, f"the tracker's background write failed: {'; '.join(errors)}")

    def _close_wait(self, error: str | None) -> float:
        """How long ``close()`` waits for the probe the worker computes: until it is done without a
        budget or when it is a probe's first run (as the budget always admits a first run), else as long
        as the budget has room (tracker time); not at all after an error."""
        if error is not None or self._worker is None or self._inflight is None:
            return 0.0
        if self.budget is None or any(j["probe"].runs == 0 for j in self._inflight["jobs"].values()):
            return math.inf
        return max(self.budget * self._budget.train - self._budget.charged, 0.0)

    def _record_cadence(self) -> None:
        """Planned vs done per inline probe into ``run.json`` (``extra.tracker.probes``) for readers that
        do not read ``tracker.json``."""
        if self.run is None or not self._probes:
            return
        keys = ("every_requested", "every", "possible_every", "planned", "done", "cadence_note")
        summary = self.status_probes()
        self.run.config["extra"]["tracker"]["probes"] = {
            name: {k: v for k, v in s.items() if k in keys} for name, s in summary.items()
        }
        self.run.config["extra"]["tracker"]["probe_worker"] = self.probe_worker
        try:
            self.run.save_config()
        except OSError as e:  # the status file has the same numbers
            warnings.warn(f"Tracker '{self.path}': run.json not updated ({e})", UserWarning, stacklevel=3)

    def __repr__(self) -> str:
        return f"Tracker({str(self.path)!r}, step={self._last_step}, probes={[p.name for p in self._probes]})"
