"""The tracker's probe worker: inline probes run on a snapshot of the weights off the training thread.

:func:`compute_probe` is the one computation of an inline probe — the runner's probe function on a model
and the fixed probe batch, under a forked RNG, eval/train mode restored, warnings recorded instead of shown,
a failure reported instead of raised (a probe must never stop training). The tracker calls it on the
training thread (``probe_worker="inline"``) or hands it to :class:`ProbeWorker`.

:class:`ProbeWorker` is one child process forked when the tracker starts (so it holds its own copy of the
model and the probe batch, whatever class the model is; nothing is pickled but weight snapshots and
results) with its own torch thread count (``threads``, default 1: the probe takes one core, training keeps
the others). A job is ``(step, probe, weights)``: the child loads the weights into its model copy, runs
:func:`compute_probe` warm-started from its own previous result of that probe, and sends back the result.
It works on one job at a time; :meth:`ProbeWorker.busy` tells the tracker to skip a due probe instead of
queueing it (the cadence it can deliver is what one core computes, never a growing backlog). The child
exits when the pipe closes — the tracker closed, or the training process died.

Cost on the training thread: pickling the weight snapshot into the pipe (the checkpoint's CPU copy, taken
anyway). Memory: the child holds its own copy of the weights (copy-on-write pages become its own when it loads
a snapshot) and the snapshot it received.

Fork needs a POSIX system and a CPU model (a forked child cannot use the parent's CUDA context);
:func:`process_available` says whether this process can use it, and why not.
"""

from __future__ import annotations

import math
import os
import pickle
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ProbeOutcome", "compute_probe", "process_available", "ProbeWorker", "warm_start"]


@dataclass
class ProbeOutcome:
    """What one probe run gave: ``result`` (``None`` when it failed), the last ``warning`` it raised, the
    ``error`` that stopped it, and its ``seconds`` (wall time where it ran)."""

    result: Any
    warning: str | None
    error: str | None
    seconds: float


def warm_start(runner_name: str, result: Any) -> Any:
    """What the next run of a probe starts from (its ``v0``): the eigenvectors of a sharpness result, a
    ``hessian_eigenvalues`` result itself; ``None`` otherwise."""
    if runner_name == "sharpness" and getattr(result, "eigenvectors", None) is not None:
        return result.eigenvectors
    if runner_name == "hessian_eigenvalues" and getattr(result, "vectors", None) is not None:
        return result
    return None


def compute_probe(
    fn: Callable[..., Any], model: nn.Module, data: Any, kwargs: Mapping[str, Any], *, device: torch.device
) -> ProbeOutcome:
    """``fn(model, data, **kwargs)`` under a forked RNG with the model's mode restored (module docstring)."""
    was_training = model.training
    devices = [device] if device.type == "cuda" else []
    t0 = time.perf_counter()
    result, error = None, None
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn(model, data, **kwargs)
        except Exception as e:  # noqa: BLE001 - a probe must never stop the user's training
            error = f"{type(e).__name__}: {e}"
        finally:
            model.train(was_training)
    warning = str(caught[-1].message) if caught else None
    return ProbeOutcome(result, warning, error, time.perf_counter() - t0)


def process_available(model: nn.Module) -> str | None:
    """``None`` when a forked probe worker can serve ``model``; else why not."""
    if not hasattr(os, "fork") or sys.platform == "darwin":
        return "no fork() on this platform (macOS forks are unsafe with torch)"
    if any(t.device.type != "cpu" for t in model.state_dict().values() if isinstance(t, Tensor)):
        return "the model is not on the CPU (a forked child cannot use the parent's accelerator)"
    return None


def _child(conn: Any, model: nn.Module, data: Any, fns: dict[str, Callable[..., Any]], threads: int) -> None:
    """The worker's loop: ``(step, [(name, runner, kwargs, n), ...], state)`` in, ``(step, [(name,
    outcome), ...])`` out; each probe sees the first ``n`` samples of ``data``."""
    from dynascope.datasets.batching import slice_inputs

    torch.set_num_threads(threads)
    previous: dict[str, Any] = {}
    while True:
        try:
            job = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        if job is None:
            return
        step, specs, state = job
        outcomes = []
        try:
            model.load_state_dict(state)
        except Exception as e:  # noqa: BLE001 - reported to the tracker
            outcomes = [
                (name, ProbeOutcome(None, None, f"loading the weights: {e}", 0.0)) for name, *_ in specs
            ]
            specs = []
        for name, runner, kwargs, n in specs:
            kw = dict(kwargs)
            if previous.get(name) is not None:
                kw["v0"] = previous[name]
            batch = (slice_inputs(data[0], slice(None, n)), data[1][:n])
            out = compute_probe(fns[runner], model, batch, kw, device=torch.device("cpu"))
            if out.result is not None:
                previous[name] = warm_start(runner, out.result)
            outcomes.append((name, out))
        try:
            try:
                payload = pickle.dumps((step, outcomes))
            except (pickle.PicklingError, TypeError, AttributeError) as e:
                why = f"the result could not be sent back: {e}"
                payload = pickle.dumps(
                    (step, [(n, ProbeOutcome(None, None, why, o.seconds)) for n, o in outcomes])
                )
            conn.send_bytes(payload)
        except OSError:  # the tracker is gone
            return


class ProbeWorker:
    """One forked child computing inline probes on weight snapshots (module docstring).

    ``model``, ``data``: the model (its copy lives in the child) and the probe batch ``(x, y)``; ``fns``:
    runner probe name → probe function (resolved before the fork); ``threads``: the child's torch threads.
    """

    def __init__(
        self, model: nn.Module, data: Any, fns: dict[str, Callable[..., Any]], *, threads: int = 1
    ) -> None:
        import multiprocessing as mp

        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"probe_threads must be a positive int, got {threads!r}")
        why = process_available(model)
        if why is not None:
            raise ValueError(f"probe worker: {why}")
        ctx = mp.get_context("fork")
        self._conn, child = ctx.Pipe(duplex=True)
        with warnings.catch_warnings():  # 3.12+: fork of a threaded process; the child runs only torch code
            warnings.simplefilter("ignore", DeprecationWarning)
            self._proc = ctx.Process(
                target=_child, args=(child, model, data, fns, threads), name="dynascope-probes", daemon=True
            )
            self._proc.start()
        child.close()
        self.threads = threads
        self._pending: tuple[int, list[str]] | None = None  # the jobs the child is working on
        self._sent_at = 0.0
        self.closed = False
        # a receiver thread waits on the pipe (holding no lock meanwhile), so a training step checks one
        # attribute instead of polling a file descriptor
        self._inbox: list[Any] = []
        self._arrived = threading.Event()
        self._receiver = threading.Thread(target=self._receive, name="dynascope-probe-results", daemon=True)
        self._receiver.start()

    def _receive(self) -> None:
        while True:
            try:
                item: Any = pickle.loads(self._conn.recv_bytes())
            except (EOFError, OSError, TypeError) as e:  # TypeError: the connection was closed under it
                item = e
            self._inbox.append(item)
            self._arrived.set()
            if isinstance(item, BaseException):
                return

    def busy(self) -> int | None:
        """The step whose probes the child is computing, or ``None`` when it is free."""
        return None if self._pending is None else self._pending[0]

    def submit(
        self, step: int, specs: list[tuple[str, str, Mapping[str, Any], int]], state: dict[str, Tensor]
    ) -> None:
        """Send the probes ``specs`` — ``(name, runner probe, kwargs, n samples)`` — at weights ``state``
        (the worker must be free: :meth:`busy`)."""
        if self._pending is not None:
            raise RuntimeError(f"probe worker is busy with step {self._pending[0]}")
        self._conn.send_bytes(pickle.dumps((step, [(a, b, dict(c), d) for a, b, c, d in specs], state)))
        self._pending = (step, [s[0] for s in specs])
        self._sent_at = time.perf_counter()

    def poll(self, timeout: float = 0.0) -> tuple[int, list[tuple[str, ProbeOutcome]]] | None:
        """``(step, [(probe, outcome), ...])`` once the child finished its jobs, else ``None`` (waits up to
        ``timeout`` seconds; ``math.inf``: until they are done). A dead child gives failed outcomes."""
        if self._pending is None:
            return None
        if not self._inbox:
            if timeout <= 0:
                return None
            while not self._arrived.wait(None if math.isinf(timeout) else timeout):
                if not self._proc.is_alive() and not self._inbox:
                    return self._lost("the probe worker process died")
                if not math.isinf(timeout):
                    return None
        self._arrived.clear()
        item = self._inbox.pop(0)
        if isinstance(item, BaseException):
            return self._lost(f"the probe worker stopped ({type(item).__name__}: {item})")
        self._pending = None
        step, outcomes = item
        return step, outcomes

    def _lost(self, why: str) -> tuple[int, list[tuple[str, ProbeOutcome]]]:
        assert self._pending is not None
        (step, names), self._pending = self._pending, None
        self.closed = True
        seconds = time.perf_counter() - self._sent_at
        return step, [(n, ProbeOutcome(None, None, why, seconds)) for n in names]

    def close(self, timeout: float = 5.0) -> None:
        """Stop the child after its jobs (their results are dropped unless :meth:`poll` took them)."""
        if self._proc.is_alive():
            try:
                self._conn.send_bytes(pickle.dumps(None))
            except OSError:
                pass
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout)
        self._receiver.join(timeout)  # it sees the end of the pipe once the child is gone
        self._conn.close()
        self.closed = True
