"""The tracker's probe worker: inline probes and the run's file writes leave the training process.

:func:`compute_probe` is the one computation of an inline probe — the runner's probe function on a model
and the fixed probe batch, under a forked RNG, eval/train mode restored, warnings recorded instead of shown,
a failure reported instead of raised (a probe must never stop training). The tracker calls it on the
training thread (``probe_worker="inline"``) or hands it to :class:`ProbeWorker`.

:class:`ProbeWorker` is one child process forked when the tracker starts (so it holds its own copy of the
model, the probe batch and the run's file writer, whatever class the model is) with its own torch thread
count (``threads``, default 1: the probes take one core, training keeps the others). The training process
keeps no thread of its own for it: it sends messages down a pipe and reads the replies when it needs them.

* ``checkpoint(step, state, optimizer, row)``: the weights (and optimizer state) at ``step``, copied at once
  into one flat byte buffer (:func:`pack`; a memory copy, nothing is pickled but the small layout) and sent
  as raw bytes. The child writes the checkpoint (``files``: the tracker's :class:`RunFiles`) and keeps the
  weights for the probes of that step.
* ``submit(step, specs)``: probes on the weights of the checkpoint of ``step``. A second thread of the child
  computes them (warm-started from its own previous result of each probe), stores each result (after its
  checkpoint) and adds its scalars to the step's metrics row, then reports ``(step, outcomes)`` back. It
  works on one job at a time; :meth:`ProbeWorker.busy` tells the tracker to skip a due probe instead of
  queueing it (the cadence it delivers is what one core computes, never a growing backlog).
* ``flush(rows, status)``: metrics rows and the status. The child appends the rows to ``metrics.csv`` in
  step order, holding back the rows from the step of a probe it still computes (the probe's scalars join
  that row), and writes the status with what it has written (``last_checkpoint``, ``last_row``).

Every write is atomic (temp file, fsync, rename) and in the order the messages came, so a reader sees each
file whole, and rows and status never name a checkpoint that is not yet on disk. The child acknowledges
each message with what it has written (:attr:`ProbeWorker.written`) and any write error (raised by the
tracker at its next call). The training process keeps what the child has not yet acknowledged — checkpoint
snapshots (their bytes bounded by ``max_pending_bytes``: the training thread waits for the child beyond
it) and rows not yet in ``metrics.csv`` — so that a child that dies loses nothing: :meth:`ProbeWorker.lost`
hands them back to be written in the training process. When the training process dies (``kill -9``) the
pipe closes: the child finishes the probe it computes, writes every row and status it received, and exits.

A bare worker (``files=None``) writes nothing and sends the probes' results back instead (tests compare
them with the synchronous computation).

Fork needs a POSIX system and a CPU model (a forked child cannot use the parent's CUDA context);
:func:`process_available` says whether this process can use it, and why not.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import queue
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

__all__ = [
    "ProbeOutcome",
    "compute_probe",
    "process_available",
    "ProbeWorker",
    "RunWriter",
    "warm_start",
    "pack",
    "unpack",
]

#: offsets of the tensors in a packed buffer are multiples of this (any dtype's alignment)
ALIGN = 16
#: the nice value the tracker gives the thread computing probes when training never waits for it (a budget
#: is set; Linux: per thread): on a machine whose cores are busy, training keeps its share and the probes
#: take what is left; with a spare core it makes no difference
PROBE_NICE = 10


@dataclass
class ProbeOutcome:
    """What one probe run gave: ``result`` (``None`` when it failed; the probe's metrics-row scalars
    when ``stored``: the worker wrote the result itself), the last ``warning`` it raised, the ``error``
    that stopped it, and its ``seconds`` (wall time where it ran)."""

    result: Any
    warning: str | None
    error: str | None
    seconds: float
    stored: bool = False


class RunWriter(Protocol):
    """The files of a run (the tracker's :class:`dynascope.tracker.RunFiles`): what the worker writes."""

    written: dict[str, Any]

    def checkpoint(
        self, step: int, state: dict[str, Tensor], optimizer: Any, row: dict[str, Any]
    ) -> None: ...

    def rows(self, rows: list[dict[str, Any]], status: dict[str, Any] | None) -> None: ...

    def store(self, meta: Mapping[str, Any], result: Any) -> dict[str, Any]: ...


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


# ------------------------------------------------------------------------------------------ packing
def pack(obj: Any) -> tuple[Any, Tensor]:
    """Nested dicts / lists / tuples holding tensors → ``(skeleton, buffer)``: the tensors copied into one
    flat ``uint8`` CPU buffer (each at an offset that is a multiple of :data:`ALIGN`), the skeleton the same
    structure with ``("__tensor__", offset, dtype, shape)`` in their place (small: pickled cheaply)."""
    found: list[tuple[Tensor, int]] = []
    total = 0

    def walk(o: Any) -> Any:
        nonlocal total
        if isinstance(o, Tensor):
            found.append((o, total))
            slot = ("__tensor__", total, o.dtype, tuple(o.shape))
            total += -(-o.numel() * o.element_size() // ALIGN) * ALIGN
            return slot
        if isinstance(o, dict):
            return {k: walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return type(o)(walk(v) for v in o)
        return o

    skeleton = walk(obj)
    buf = torch.empty(total, dtype=torch.uint8)
    for t, off in found:
        n = t.numel() * t.element_size()
        buf[off : off + n].view(t.dtype).view(t.shape).copy_(t.detach())
    return skeleton, buf


def unpack(skeleton: Any, buf: Tensor) -> Any:
    """The object :func:`pack` packed, its tensors copied out of ``buf`` (a flat ``uint8`` tensor)."""
    if isinstance(skeleton, tuple) and len(skeleton) == 4 and skeleton[0] == "__tensor__":
        _, off, dtype, shape = skeleton
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        return buf[off : off + n].view(dtype).view(shape).clone()
    if isinstance(skeleton, dict):
        return {k: unpack(v, buf) for k, v in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(unpack(v, buf) for v in skeleton)
    return skeleton


# ------------------------------------------------------------------------------------------ the child
class _Child:
    """The worker process: the main thread reads messages and writes; a probe thread computes probes."""

    def __init__(
        self,
        conn: Any,
        model: nn.Module,
        data: Any,
        fns: dict[str, Callable[..., Any]],
        files: RunWriter | None,
        nice: int,
    ) -> None:
        self.conn, self.model, self.data, self.fns, self.files = conn, model, data, fns, files
        self.nice = nice
        self.lock = threading.Lock()  # the run's files and the held rows (main thread and probe thread)
        self.jobs: queue.Queue[Any] = queue.Queue()
        self.held: dict[int, dict[str, Any]] = {}  # rows not yet written
        self.computing: list[int] = []  # steps of the probe jobs queued or running (their rows wait)
        self.complete_below = 0  # the training process has sent every row of the steps before this
        self.dropped = False  # closed without waiting for the probe job in progress
        self.status: dict[str, Any] | None = None  # the last status received
        self.weights: tuple[int, Any] | None = None  # the last checkpoint's weights
        self.errors: list[str] = []
        self.previous: dict[str, Any] = {}
        # replies leave from their own thread: a full pipe never blocks the reader of the training
        # process's messages (the training process could then block on its own send: a deadlock)
        self.outbox: queue.Queue[Any] = queue.Queue()

    def sender(self) -> None:
        while (msg := self.outbox.get()) is not None:
            try:
                self.conn.send_bytes(pickle.dumps(msg))
            except OSError:  # the training process is gone
                pass

    def guarded(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - reported to the tracker, which raises it
            self.errors.append(
                f"{type(e).__name__}: {e}" if what == "" else f"{what}: {type(e).__name__}: {e}"
            )
            return None

    def reply(self, kind: str, *args: Any) -> None:
        """Under ``lock``: ``(kind, *args, written, errors)``."""
        errors, self.errors = self.errors, []
        written = dict(self.files.written) if self.files is not None else {}
        self.outbox.put((kind, *args, written, errors))

    def release(self, final: bool = False) -> None:
        """Under ``lock``: write the held rows that are complete — before the first step a probe computes
        and before :attr:`complete_below`; every row when ``final`` — and the status."""
        if self.files is None:
            return
        upto = math.inf if final else min([*self.computing, self.complete_below])
        rows = [self.held.pop(s) for s in sorted(self.held) if s < upto]
        if rows or self.status is not None:
            self.guarded("", lambda: self.files.rows(rows, self.status))

    def probes(self) -> None:
        from dynascope.datasets.batching import slice_inputs

        if self.nice:
            try:  # this thread only (its torch threads inherit it): writes keep their priority
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
            except (AttributeError, OSError):
                pass

        while (job := self.jobs.get()) is not None:
            step, specs, state = job
            outcomes: list[tuple[str, ProbeOutcome]] = []
            try:
                self.model.load_state_dict(state)
            except Exception as e:  # noqa: BLE001 - reported to the tracker
                outcomes = [(s[0], ProbeOutcome(None, None, f"loading the weights: {e}", 0.0)) for s in specs]
                specs = []
            for name, runner, kwargs, n, meta in specs:
                kw = dict(kwargs)
                if self.previous.get(name) is not None:
                    kw["v0"] = self.previous[name]
                batch = (slice_inputs(self.data[0], slice(None, n)), self.data[1][:n])
                out = compute_probe(self.fns[runner], self.model, batch, kw, device=torch.device("cpu"))
                if out.result is not None:
                    self.previous[name] = warm_start(runner, out.result)
                outcomes.append((name, out))
                if self.files is not None and out.result is not None:
                    with self.lock:  # a failed store is a write error (the tracker raises it)
                        if self.dropped:  # the tracker closed without waiting for this job
                            return
                        scalars = self.guarded(
                            f"storing {name} at step {step}",
                            lambda m=meta, r=out.result: self.files.store(m, r),
                        )
                        self.held.setdefault(step, {"step": step}).update(scalars or {})
                        out.result, out.stored = scalars or {}, True
            with self.lock:
                if self.dropped:
                    return
                self.computing.remove(step)
                self.release()
                self.reply("done", step, self.sendable(outcomes), time.perf_counter())
            self.jobs.task_done()
        self.jobs.task_done()

    def sendable(self, outcomes: list[tuple[str, ProbeOutcome]]) -> list[tuple[str, ProbeOutcome]]:
        try:
            pickle.dumps(outcomes)
            return outcomes
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            why = f"the result could not be sent back: {e}"
            return [(n, ProbeOutcome(None, None, why, o.seconds)) for n, o in outcomes]

    def run(self) -> None:
        worker = threading.Thread(target=self.probes, name="dynascope-probes", daemon=True)
        sender = threading.Thread(target=self.sender, name="dynascope-replies", daemon=True)
        worker.start()
        sender.start()
        while True:
            try:
                msg = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                break  # the training process is gone: finish what it sent
            if msg[0] == "stop":  # ("stop", seq, drop): drop = do not wait for the probe job in progress
                if msg[2]:
                    with self.lock:
                        self.dropped = True
                        self.computing.clear()
                break
            kind, seq = msg[0], msg[1]
            if kind == "checkpoint":
                _, _, step, skeleton, row, write = msg
                try:
                    raw = bytearray(self.conn.recv_bytes())
                except (EOFError, OSError):
                    break
                buf = torch.frombuffer(raw, dtype=torch.uint8)
                state, optimizer = unpack(skeleton, buf)
                self.weights = (step, state)
                if write and self.files is not None:
                    with self.lock:
                        self.guarded(
                            f"checkpoint of step {step}",
                            lambda s=step, st=state, o=optimizer, r=row: self.files.checkpoint(s, st, o, r),
                        )
            elif kind == "probe":
                _, _, step, specs = msg
                assert self.weights is not None and self.weights[0] == step
                with self.lock:
                    self.computing.append(step)
                self.jobs.put((step, specs, self.weights[1]))
            elif kind == "flush":
                _, _, rows, status, complete_below = msg
                with self.lock:
                    for r in rows:
                        self.held.setdefault(int(r["step"]), {}).update(r)
                    self.complete_below = max(self.complete_below, complete_below)
                    if status is not None:
                        self.status = status
                    self.release()
            elif kind == "sync":
                self.jobs.join()
            with self.lock:
                self.reply("ack", seq)
        if not self.dropped:
            self.jobs.put(None)
            worker.join()  # the probe job in progress finishes first (dropped: it dies with the process)
        with self.lock:
            self.release(final=True)
            self.reply("bye", None)
        self.outbox.put(None)
        sender.join()


def _child_main(
    conn: Any,
    parent_end: Any,
    model: nn.Module,
    data: Any,
    fns: dict[str, Callable[..., Any]],
    threads: int,
    files: RunWriter | None,
    nice: int,
) -> None:
    parent_end.close()  # else the pipe would outlive the training process: the child must see it close
    torch.set_num_threads(threads)
    _Child(conn, model, data, fns, files, nice).run()


# ------------------------------------------------------------------------------------------ the parent
class ProbeWorker:
    """One forked child computing inline probes on checkpoint weights and writing the run (module docstring).

    ``model``, ``data``: the model (its copy lives in the child) and the probe batch ``(x, y)``; ``fns``:
    runner probe name → probe function (resolved before the fork); ``threads``: the child's torch threads;
    ``files``: the run's writer (its copy lives in the child; ``None``: probe results come back instead);
    ``wait_writes``: each checkpoint and flush returns once the child has written it; ``nice``: added to
    the nice value of the child's probe thread (:data:`PROBE_NICE`);
    ``max_pending_bytes``: checkpoint bytes handed over and not yet written before the training thread waits.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        fns: dict[str, Callable[..., Any]],
        *,
        threads: int = 1,
        files: RunWriter | None = None,
        wait_writes: bool = False,
        nice: int = 0,
        max_pending_bytes: int = 256 << 20,
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
                target=_child_main,
                args=(child, self._conn, model, data, fns, threads, files, nice),
                name="dynascope-probes",
                daemon=True,
            )
            self._proc.start()
        child.close()
        self.threads = threads
        self.writes = files is not None
        self.wait_writes = wait_writes
        self.max_pending_bytes = max_pending_bytes
        self.written: dict[str, Any] = dict(files.written) if files is not None else {}
        self.closed = False
        self.wait_seconds = 0.0  # the training thread's waits for the child
        self.done_at: float | None = None  # when the child finished its last job (CLOCK_MONOTONIC)
        self._seq = 0
        self._acked = 0
        self._pending: tuple[int, list[str]] | None = None  # the probe job the child is working on
        self._sent_at = 0.0
        self._done: collections.deque[tuple[int, list[tuple[str, ProbeOutcome]]]] = collections.deque()
        self._errors: list[str] = []
        # what the child has not yet written: checkpoints (seq, step, skeleton, buffer, row) and rows
        self._unacked: collections.deque[tuple[int, int, Any, Tensor, dict[str, Any]]] = collections.deque()
        self._unacked_bytes = 0
        self._rows: dict[int, dict[str, Any]] = {}

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    # ------------------------------------------------------------------ replies
    def _receive(self, timeout: float) -> bool:
        """Read the replies waiting (up to ``timeout`` seconds for the first; ``math.inf``: until one
        comes). ``False`` when none came; a closed pipe marks the worker closed."""
        got = False
        while not self.closed:
            try:
                if not self._conn.poll(0 if got else (None if math.isinf(timeout) else timeout)):
                    return got
                msg = pickle.loads(self._conn.recv_bytes())
            except (EOFError, OSError, TypeError):  # TypeError: the connection was closed under it
                self.closed = True
                return got
            got = True
            kind, *args, written, errors = msg
            self.written.update(written)
            self._errors.extend(errors)
            last_row = self.written.get("last_row")
            if last_row is not None and self._rows:
                for s in [s for s in self._rows if s <= last_row]:
                    del self._rows[s]
            if kind == "ack":
                self._acked = max(self._acked, args[0])
                while self._unacked and self._unacked[0][0] <= self._acked:
                    self._unacked_bytes -= self._unacked.popleft()[3].numel()
            elif kind == "done":
                self._done.append((args[0], args[1]))
                self.done_at = args[2]
            elif kind == "bye":
                self.closed = True
        return got

    def _wait(self, until: Callable[[], bool], timeout: float = math.inf) -> None:
        """Read replies until ``until()``, the child is gone or ``timeout`` seconds have passed."""
        t0 = time.perf_counter()
        deadline = t0 + timeout
        while not until() and not self.closed:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            if not self._receive(min(left, 1.0)) and not self._proc.is_alive():
                self._receive(0.0)
                self.closed = True
        self.wait_seconds += time.perf_counter() - t0

    def _send(self, msg: tuple[Any, ...], raw: Tensor | None = None) -> int:
        if self.closed:
            return self._seq
        self._receive(0.0)  # replies never pile up in the pipe (the child would block on them)
        self._seq += 1
        try:
            self._conn.send_bytes(pickle.dumps((msg[0], self._seq, *msg[1:])))
            if raw is not None:
                self._conn.send_bytes(memoryview(raw.numpy()))
        except OSError:
            self.closed = True
        return self._seq

    # ------------------------------------------------------------------ hand-over (training thread)
    def checkpoint(
        self,
        step: int,
        state: Mapping[str, Tensor],
        optimizer: Any = None,
        row: Mapping[str, Any] | None = None,
        *,
        write: bool = True,
    ) -> None:
        """Copy ``state`` (and ``optimizer``, a state keyed by name) now and send them: the child writes the
        checkpoint of ``step`` (``write``) and keeps the weights for the probes of ``step``."""
        if self.max_pending_bytes and self._unacked_bytes >= self.max_pending_bytes:
            self._wait(lambda: self._unacked_bytes < self.max_pending_bytes)
        skeleton, buf = pack((dict(state), optimizer))
        row = dict(row or {})
        seq = self._send(("checkpoint", step, skeleton, row, write and self.writes), buf)
        if write and self.writes:
            self._unacked.append((seq, step, skeleton, buf, row))
            self._unacked_bytes += buf.numel()
            if self.wait_writes:
                self._wait(lambda: self._acked >= seq)

    def flush(self, rows: list[dict[str, Any]], status: dict[str, Any] | None, complete_below: int) -> None:
        """Send metrics ``rows`` and the ``status``: the child writes them (module docstring). Every row
        of the steps before ``complete_below`` has been sent (a probe's scalars never start a row)."""
        for r in rows:
            self._rows.setdefault(int(r["step"]), {}).update(r)
        seq = self._send(("flush", rows, status, complete_below))
        if self.wait_writes:
            self._wait(lambda: self._acked >= seq)

    def busy(self) -> int | None:
        """The step whose probes the child is computing, or ``None`` when it is free."""
        return None if self._pending is None else self._pending[0]

    def submit(
        self, step: int, specs: list[tuple[str, str, Mapping[str, Any], int, Mapping[str, Any]]]
    ) -> None:
        """Compute the probes ``specs`` — ``(name, runner probe, kwargs, n samples, store meta)`` — on the
        weights of the checkpoint of ``step`` (sent last; the worker must be free: :meth:`busy`)."""
        if self._pending is not None:
            raise RuntimeError(f"probe worker is busy with step {self._pending[0]}")
        self._send(("probe", step, [(a, b, dict(c), d, dict(e)) for a, b, c, d, e in specs]))
        self._pending = (step, [s[0] for s in specs])
        self._sent_at = time.perf_counter()

    def poll(self, timeout: float = 0.0) -> tuple[int, list[tuple[str, ProbeOutcome]]] | None:
        """``(step, [(probe, outcome), ...])`` once the child finished its jobs, else ``None`` (waits up to
        ``timeout`` seconds; ``math.inf``: until they are done). A dead child gives failed outcomes."""
        if self._pending is None:
            return None
        if not self._done and not self.closed:
            if timeout <= 0:
                self._receive(0.0)
            else:
                self._wait(lambda: bool(self._done), timeout)
        if self._done:
            self._pending = None
            return self._done.popleft()
        if self.closed:
            return self._lost_job("the probe worker process died")
        return None

    def sync(self) -> None:
        """Wait until the child has done everything sent so far (probes included)."""
        seq = self._send(("sync",))
        self._wait(lambda: self._acked >= seq)

    def errors(self) -> list[str]:
        """The write errors the child reported since the last call (and forgets them)."""
        out, self._errors = self._errors, []
        return out

    def _lost_job(self, why: str) -> tuple[int, list[tuple[str, ProbeOutcome]]]:
        assert self._pending is not None
        (step, names), self._pending = self._pending, None
        seconds = time.perf_counter() - self._sent_at
        return step, [(n, ProbeOutcome(None, None, why, seconds)) for n in names]

    @property
    def unwritten(self) -> bool:
        """Checkpoints or rows sent that the child has not reported written."""
        return bool(self._unacked or self._rows)

    def lost(self) -> tuple[list[tuple[int, dict[str, Tensor], Any, dict[str, Any]]], list[dict[str, Any]]]:
        """After the child died: the checkpoints ``(step, state, optimizer, row)`` and the metrics rows it may
        not have written (rows up to ``written["last_row"]`` are in ``metrics.csv``)."""
        cks = []
        for _, step, skeleton, buf, row in self._unacked:
            state, optimizer = unpack(skeleton, buf)
            cks.append((step, state, optimizer, row))
        self._unacked.clear()
        self._unacked_bytes = 0
        rows = [self._rows.pop(s) for s in sorted(self._rows)]
        return cks, rows

    def close(self, timeout: float = 60.0, *, drop: bool = False) -> None:
        """Stop the child once it has written everything sent (the probe job in progress finishes first,
        unless ``drop``: its result is then lost and its step's row written without it)."""
        if not self.closed:
            self._send(("stop", drop))
            deadline = time.perf_counter() + timeout
            while not self.closed and time.perf_counter() < deadline:
                if not self._receive(1.0) and not self._proc.is_alive():
                    self._receive(0.0)
                    break
        self._proc.join(5.0)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5.0)
        self._conn.close()
        self.closed = True
